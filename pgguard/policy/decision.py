"""`decide()`: who may run what, and what needs a step-up first (DESIGN §5, §6). Pure.

    decide(policy, user, classification, grants, now, fresh=frozenset())
        → Allow(rule, …) | Deny(reason, rule, …) | StepUp(classes, triggers, reason, rule, …)

1. An empty classification (an empty query) is allowed: nothing runs.
2. The user's role: first `roles.<name>.users` glob that matches, else `default_role`; none →
   Deny, rule `default_role`.
3. Every class the statement carries must be in the role's `allow` (`all` includes `unknown`),
   else Deny naming the role, each refused class and what triggered it; rule
   `roles.<name>.allow`. Denial wins over step-up.
4. Each carried class in the role's `step_up` needs an unexpired grant (`grants[cls] > now`), or
   a code verified for this very statement (`cls in fresh`). A class with ttl 0 is never covered
   by a grant: only `fresh` covers it. Any class left → StepUp, rule
   `roles.<name>.step_up.<cls>` per class; none left → Allow with the same rule and `granted`.

`grants` is what the state store holds for the session: class → expires_at (the same clock as
`now`, seconds). `fresh` is for the proxy re-deciding a held statement right after its step-up
succeeded: pass the StepUp's classes. `grants_after_stepup()` computes what a step-up grants.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from pgguard.classify.classes import StatementClass
from pgguard.classify.classifier import ADMIN_CATALOGS, Classification
from pgguard.classify.functions import side_effect_of
from pgguard.policy.model import Policy, Role

__all__ = [
    "Allow",
    "Decision",
    "Deny",
    "Grants",
    "StepUp",
    "Trigger",
    "decide",
    "format_triggers",
    "grants_after_stepup",
    "triggers_for",
]

C = StatementClass

Grants = Mapping[StatementClass, float]
"""class → expires_at (seconds, the clock `now` is read from)."""

Trigger = tuple[StatementClass, tuple[str, ...]]
"""One class and what made the statement carry it: `(pii, ("public.users.email",))`."""

TRIGGER_LIMIT = 10
"""At most this many items per class in messages; the rest are counted (`… and 3 more`)."""


@dataclass(frozen=True, slots=True)
class Allow:
    """Forward the statement. `granted`: the step-up classes a grant or fresh code covered."""

    rule: str
    role: str | None = None
    matched_by: str = ""
    granted: frozenset[StatementClass] = frozenset()
    kind: ClassVar[str] = "allow"


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse with ERROR 42501 and `reason` as the message (it starts with `pgguard: `)."""

    reason: str
    rule: str
    role: str | None = None
    matched_by: str = ""
    classes: tuple[StatementClass, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    kind: ClassVar[str] = "deny"


@dataclass(frozen=True, slots=True)
class StepUp:
    """Hold the statement until the session steps up.

    `classes` need a grant (sorted by name); `triggers` pairs each with what triggered it;
    `reason` is `step-up required (pii: public.users.email; write: orders)`, `notice` the whole
    NOTICE message of DESIGN §1. `fresh_only`: every class has ttl 0, so the step-up grants
    nothing lasting for them (the held statement is still released).
    """

    classes: tuple[StatementClass, ...]
    triggers: tuple[Trigger, ...]
    reason: str
    rule: str
    role: str
    matched_by: str = ""
    fresh_only: bool = False
    kind: ClassVar[str] = "step_up"

    @property
    def triggers_text(self) -> str:
        return format_triggers(self.triggers)

    @property
    def notice(self) -> str:
        return f"pgguard: statement held: {self.reason}"


Decision = Allow | Deny | StepUp

_EMPTY = Allow(rule="empty")


def decide(policy: Policy, user: str, classification: Classification, grants: Grants,
           now: float, *, fresh: Collection[StatementClass] = frozenset()) -> Decision:
    """The policy's verdict on one message for `user` at time `now` (see the module doc)."""
    classes = classification.classes
    if not classes:
        return _EMPTY
    role, matched_by = policy.resolve(user)
    if role is not None and classes <= role.allow and role.step_up_classes.isdisjoint(classes):
        return Allow(role.allow_rule, role.name, matched_by)  # the common case, kept short
    if role is None:
        return Deny(f"pgguard: user {user} matches no role and there is no default_role",
                    "default_role", None, matched_by, tuple(_ordered(classes)))
    denied = classes - role.allow
    if denied:
        ordered = _ordered(denied)
        triggers = tuple((cls, triggers_for(cls, classification)) for cls in ordered)
        what = ", ".join(f"{cls.value} ({_items(items)})" for cls, items in triggers)
        return Deny(f"pgguard: role {role.name} may not run {what}",
                    f"roles.{role.name}.allow", role.name, matched_by, tuple(ordered), triggers)
    gated = [cls for cls in _ordered(classes) if cls in role.step_up]
    rule = ", ".join(f"roles.{role.name}.step_up.{cls.value}" for cls in gated)
    missing = [cls for cls in gated if not _covered(role, cls, grants, now, fresh)]
    if not missing:
        return Allow(rule, role.name, matched_by, frozenset(gated))
    triggers = tuple((cls, triggers_for(cls, classification)) for cls in missing)
    return StepUp(
        classes=tuple(missing),
        triggers=triggers,
        reason=f"step-up required ({format_triggers(triggers)})",
        rule=", ".join(f"roles.{role.name}.step_up.{cls.value}" for cls in missing),
        role=role.name,
        matched_by=matched_by,
        fresh_only=all(role.step_up[cls] <= 0 for cls in missing),
    )


def grants_after_stepup(role: Role, now: float) -> dict[StatementClass, float]:
    """What a successful step-up grants (DESIGN §6): every `step_up` class of the role whose ttl
    is above 0, each until `now + ttl`. ttl-0 classes get nothing lasting."""
    return {cls: now + ttl for cls, ttl in role.step_up.items() if ttl > 0}


def format_triggers(triggers: Iterable[Trigger], limit: int = TRIGGER_LIMIT) -> str:
    """`pii: public.users.email, public.users.phone; write: public.orders`."""
    return "; ".join(f"{cls.value}: {_items(items, limit)}" for cls, items in triggers)


def triggers_for(cls: StatementClass, c: Classification) -> tuple[str, ...]:
    """What made `c` carry `cls`, for messages and the audit:

    - pii: the PII columns (`public.users.email`, `public.customers.*`, `public.f()`);
    - unknown: the classifier's reason for each unknown statement;
    - admin: admin functions and catalogs, else the statements' leading keywords (`VACUUM`);
    - read, write, ddl: the tables, else the functions, else the leading keywords;
    - tx: the leading keywords (`BEGIN`, `SET`).

    Tables and functions are the message's (the classifier does not split them per statement).
    """
    if cls is C.PII:
        found: tuple[str, ...] = c.pii_columns
    elif cls is C.UNKNOWN:
        found = _unique(s.reason for s in c.statements if C.UNKNOWN in s.classes and s.reason)
        if not found and c.reason:
            found = (c.reason,)
    elif cls is C.ADMIN:
        found = _unique([*(f for f in c.functions if side_effect_of(_bare(f)) == "admin"),
                         *(t for t in c.tables if _bare(t) in ADMIN_CATALOGS)])
    elif cls is C.TX:
        found = ()
    else:
        found = c.tables or c.functions
    if not found:
        found = _unique(_keywords(s.sql) for s in c.statements if cls in s.classes)
    return found or (cls.value,)


def _covered(role: Role, cls: StatementClass, grants: Grants, now: float,
             fresh: Collection[StatementClass]) -> bool:
    if cls in fresh:
        return True
    if role.step_up[cls] <= 0:  # ttl 0: a fresh code for every statement
        return False
    expires_at = grants.get(cls)
    return expires_at is not None and expires_at > now


def _ordered(classes: Iterable[StatementClass]) -> list[StatementClass]:
    return sorted(classes, key=lambda cls: cls.value)


def _items(items: tuple[str, ...], limit: int = TRIGGER_LIMIT) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" and {len(items) - limit} more"


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


def _bare(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


# Leading keywords of a statement, past comments and parentheses: `CREATE ROLE`, `VACUUM`,
# `SET search_path`. Only identifier-shaped words, so no literal can leak into a message.
_LEAD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*([A-Za-z_][A-Za-z0-9_]*)", re.S)
_WORD = re.compile(r"\s+([A-Za-z_][A-Za-z0-9_]*)")
_TWO_WORD_VERBS = frozenset({"CREATE", "ALTER", "DROP", "SET", "RESET", "COMMENT", "SECURITY",
                             "IMPORT", "REFRESH", "START", "SHOW", "DISCARD"})
_MODIFIERS = frozenset({"OR", "REPLACE", "UNIQUE", "TEMP", "TEMPORARY", "UNLOGGED", "GLOBAL",
                        "LOCAL", "MATERIALIZED", "FOREIGN", "EVENT", "TRUSTED", "PROCEDURAL",
                        "DEFAULT", "RECURSIVE", "CONSTRAINT", "SESSION", "DATA", "IF"})


def _keywords(sql: str) -> str:
    m = _LEAD.match(sql)
    if m is None:
        return ""
    words = [m.group(1).upper()]
    pos = m.end()
    # CREATE [OR REPLACE] [TEMP] VIEW: the verb, its modifiers and one object word.
    while words[0] in _TWO_WORD_VERBS and len(words) < 4:
        w = _WORD.match(sql, pos)
        if w is None:
            break
        words.append(w.group(1).upper())
        pos = w.end()
        if words[-1] not in _MODIFIERS:
            break
    return " ".join(words)
