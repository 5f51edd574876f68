"""The question the relay asks at each Query and first Execute: forward, refuse or hold?

The relay (session.py) owns *how* a statement is refused or held (DESIGN §3: poison recipe,
hold queue); a `Guard` only decides *whether*. The policy issue plugs its decision in here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from pgguard.errors import SqlState

__all__ = ["Allow", "AllowAll", "Guard", "Refuse", "RefusePattern", "StatementInfo", "Verdict"]


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """What the relay knows of a statement when it asks: its text (decoded in the client
    encoding; None when it could not be decoded) and the message it came in."""

    sql: str | None
    message: str  # "query" | "execute"
    statement_name: str | None = None


@dataclass(frozen=True, slots=True)
class Allow:
    pass


@dataclass(frozen=True, slots=True)
class Refuse:
    sqlstate: str
    message: str
    detail: str | None = None
    hint: str | None = None


Verdict = Allow | Refuse

ALLOW = Allow()


class Guard(Protocol):
    def check(self, user: str, info: StatementInfo) -> Verdict: ...


class AllowAll:
    def check(self, user: str, info: StatementInfo) -> Verdict:
        return ALLOW


class RefusePattern:
    """Test hook (config `debug.refuse_pattern`): refuse statements whose text matches."""

    def __init__(self, pattern: str) -> None:
        self._re = re.compile(pattern)

    def check(self, user: str, info: StatementInfo) -> Verdict:
        if info.sql is None or self._re.search(info.sql):
            return Refuse(SqlState.INSUFFICIENT_PRIVILEGE, "pgguard: statement rejected by policy")
        return ALLOW
