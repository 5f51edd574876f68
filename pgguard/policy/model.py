"""The policy model of DESIGN §5: roles matched by user-name globs, `default_role`.

A `Role` says which statement classes its users may run (`allow`) and which of those need a
step-up first (`step_up`, class → ttl in seconds; ttl 0 = a fresh code for every statement).
`Policy.role_for(user)` is the first role whose globs match (`fnmatch.fnmatchcase`: `*`, `?`,
`[seq]`, case-sensitive, like PostgreSQL user names), else `default_role`, else None.

Built by `pgguard.config.load_config` from the `roles:` section; a `step_up` list there has
already been given `stepup.default_ttl`, so every ttl here is a number.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pgguard.classify.classes import StatementClass

__all__ = ["ALL_CLASSES", "Policy", "Role"]

ALL_CLASSES: frozenset[StatementClass] = frozenset(StatementClass)
"""`allow: all`: every class, `unknown` included (DESIGN §5)."""

_MATCH_NOTHING = re.compile(r"(?!)")
_MEMO_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Role:
    """One entry of `roles:`. `step_up` classes are always a subset of `allow`."""

    name: str
    users: tuple[str, ...] = ()
    allow: frozenset[StatementClass] = frozenset()
    step_up: Mapping[StatementClass, float] = field(default_factory=dict)
    # All globs compiled into one anchored regex (what fnmatchcase does per glob, done once).
    _pattern: re.Pattern[str] = field(default=_MATCH_NOTHING, init=False, repr=False,
                                      compare=False)
    step_up_classes: frozenset[StatementClass] = field(default=frozenset(), init=False,
                                                       repr=False, compare=False)
    allow_rule: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", tuple(self.users))
        object.__setattr__(self, "allow", frozenset(self.allow))
        object.__setattr__(self, "step_up", MappingProxyType(dict(self.step_up)))
        object.__setattr__(self, "step_up_classes", frozenset(self.step_up))
        object.__setattr__(self, "allow_rule", f"roles.{self.name}.allow")
        if self.users:
            # fnmatch.translate yields `(?s:…)\Z`; alternation of those equals fnmatchcase on
            # each glob in turn.
            joined = "|".join(fnmatch.translate(g) for g in self.users)
            object.__setattr__(self, "_pattern", re.compile(joined))

    @property
    def allows_all(self) -> bool:
        return self.allow >= ALL_CLASSES

    def matches(self, user: str) -> bool:
        """True if any of `users` matches (fnmatchcase semantics)."""
        return self._pattern.match(user) is not None

    def ttl(self, cls: StatementClass) -> float | None:
        """The step-up ttl of `cls`, or None when `cls` needs no step-up in this role."""
        return self.step_up.get(cls)


@dataclass(frozen=True, slots=True)
class Policy:
    """The roles in file order (first match wins) and the optional `default_role` name.

    `configured` is False for a file without `roles:`: every statement is then allowed (the
    proxy-only mode of earlier releases); the app should say so at start.
    """

    roles: tuple[Role, ...] = ()
    default_role: str | None = None
    configured: bool = True
    # user → (role, how it was chosen): decide() runs at every Query; the answer depends only on
    # this immutable policy, so memoising it is safe. Bounded: cleared when full.
    _memo: dict[str, tuple[Role | None, str]] = field(default_factory=dict, init=False,
                                                      repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", tuple(self.roles))
        names = [r.name for r in self.roles]
        if len(set(names)) != len(names):
            raise ValueError("role names must be unique")
        if self.default_role is not None and self.default_role not in names:
            raise ValueError(f"default_role {self.default_role!r} names no role")

    @classmethod
    def unrestricted(cls) -> Policy:
        """No `roles:` in the file: one implicit role that allows everything, no step-up."""
        return cls((Role("default", ("*",), ALL_CLASSES, {}),), "default", configured=False)

    def role(self, name: str) -> Role | None:
        for r in self.roles:
            if r.name == name:
                return r
        return None

    def role_for(self, user: str) -> Role | None:
        """First role whose `users` globs match, else `default_role`, else None (denied)."""
        return self.resolve(user)[0]

    def matched_by_default(self, user: str) -> bool:
        """True when `user` gets a role only through `default_role` (or gets none)."""
        return self.resolve(user)[1] == "default_role"

    def resolve(self, user: str) -> tuple[Role | None, str]:
        """(role, how): how is `roles.<name>.users` or `default_role` (also when None)."""
        hit = self._memo.get(user)
        if hit is not None:
            return hit
        found: tuple[Role | None, str] = (None, "default_role")
        for r in self.roles:
            if r.matches(user):
                found = (r, f"roles.{r.name}.users")
                break
        else:
            if self.default_role is not None:
                found = (self.role(self.default_role), "default_role")
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[user] = found
        return found
