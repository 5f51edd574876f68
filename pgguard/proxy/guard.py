"""The question the relay asks at each Query and first Execute: forward, refuse or hold?

The relay (session.py) owns *how* a statement is refused or held (DESIGN §3: poison recipe,
hold queue); a `Guard` only decides *whether*. `app.py` plugs the policy in (PolicyGuard);
`RefusePattern` is the test hook of `debug.refuse_pattern`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pgguard.classify import Classification
from pgguard.errors import SqlState
from pgguard.policy import Allow as PolicyAllow
from pgguard.policy import Deny, Policy, decide
from pgguard.proxy.grants import GrantBook

__all__ = ["ALLOW", "Allow", "AllowAll", "Guard", "NeedStepUp", "PolicyGuard", "Refuse",
           "RefusePattern", "SessionView", "Verdict"]


class SessionView(Protocol):
    """What a guard may know of the session asking."""

    id: str
    user: str
    client_addr: str


@dataclass(frozen=True, slots=True)
class Allow:
    """Forward. `cacheable`: the verdict depends on the statement alone (no grant, no clock),
    so the relay may reuse it for later Executes of the same prepared statement until the
    policy changes (`ProxyContext.guard_epoch`)."""

    rule: str | None = None
    cacheable: bool = False


@dataclass(frozen=True, slots=True)
class Refuse:
    sqlstate: str
    message: str
    detail: str | None = None
    hint: str | None = None
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class NeedStepUp:
    """Hold the statement until the session steps up. `classes` are the class names that need
    it; `triggers` says what triggered each (`pii: public.users.email; write: public.orders`)."""

    classes: tuple[str, ...]
    triggers: str
    rule: str | None = None


Verdict = Allow | Refuse | NeedStepUp

ALLOW = Allow(cacheable=True)


class Guard(Protocol):
    def check(self, session: SessionView, classification: Classification,
              sql: str | None) -> Verdict: ...


class AllowAll:
    def check(self, session: SessionView, classification: Classification,
              sql: str | None) -> Verdict:
        return ALLOW


class RefusePattern:
    """Test hook (config `debug.refuse_pattern`): refuse statements whose text matches, wrapped
    around another guard."""

    def __init__(self, pattern: str, inner: Guard | None = None) -> None:
        self._re = re.compile(pattern)
        self._inner = inner or AllowAll()

    def check(self, session: SessionView, classification: Classification,
              sql: str | None) -> Verdict:
        if sql is None or self._re.search(sql):
            return Refuse(SqlState.INSUFFICIENT_PRIVILEGE, "pgguard: statement rejected by policy")
        return self._inner.check(session, classification, sql)


class PolicyGuard:
    """The policy (DESIGN §5) over the session's grants: pgguard's real guard.

    `policy()` returns the policy in force (it changes on reload); `clock()` is wall time,
    the same clock grants are stamped with.
    """

    def __init__(self, policy: Callable[[], Policy], grants: GrantBook,
                 clock: Callable[[], float] = time.time) -> None:
        self._policy = policy
        self._grants = grants
        self._clock = clock

    def check(self, session: SessionView, classification: Classification,
              sql: str | None) -> Verdict:
        now = self._clock()
        grants = self._grants.for_session(session.id, session.user, session.client_addr, now)
        d = decide(self._policy(), session.user, classification, grants, now)
        if isinstance(d, PolicyAllow):
            return Allow(d.rule, cacheable=not d.granted)
        if isinstance(d, Deny):
            return Refuse(SqlState.INSUFFICIENT_PRIVILEGE, d.reason, rule=d.rule)
        return NeedStepUp(tuple(c.value for c in d.classes), d.triggers_text, d.rule)
