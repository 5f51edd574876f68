"""The policy (DESIGN §5): roles matched by user-name globs, and the pure `decide()`.

How the proxy and the app use it:

    config = load_config(path)                 # pgguard.config: validates roles, builds Policy
    policy = config.policy                     # Policy(roles, default_role)
    d = decide(policy, user, classification, grants, now)   # grants: class → expires_at
    match d:
        case Allow():  ...                     # forward
        case Deny():   ...                     # refuse: ERROR 42501, message d.reason
        case StepUp(): ...                     # hold; NOTICE d.notice (triggers: d.triggers_text)
    # after a successful step-up (role = policy.role_for(user)):
    new_grants = grants_after_stepup(role, now)             # ttl-0 classes are not granted
    decide(policy, user, classification, {**grants, **new_grants}, now, fresh=d.classes)

`policy.resolve(user)` → (role, matched_by) is memoised per policy object, so a reload (a new
Policy) starts afresh. `d.rule` names the config entry that decided (`roles.oncall.allow`,
`roles.oncall.step_up.pii`, `default_role`), `d.matched_by` how the role was chosen
(`roles.oncall.users` or `default_role`); both go to explain and the audit.
"""

from pgguard.policy.decision import (
    Allow,
    Decision,
    Deny,
    Grants,
    StepUp,
    Trigger,
    decide,
    format_triggers,
    grants_after_stepup,
    triggers_for,
)
from pgguard.policy.model import ALL_CLASSES, Policy, Role

__all__ = [
    "ALL_CLASSES",
    "Allow",
    "Decision",
    "Deny",
    "Grants",
    "Policy",
    "Role",
    "StepUp",
    "Trigger",
    "decide",
    "format_triggers",
    "grants_after_stepup",
    "triggers_for",
]
