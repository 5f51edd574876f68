"""The state store interface (DESIGN §2 `state/`, §6): everything step-up must remember.

One backend-neutral async interface; `SqliteStore` (pgguard/state/sqlite.py) is the single-node
backend, a PostgreSQL backend for several replicas comes later. Callers (the step-up service,
the proxy, the admin API, `pgguard enroll`) depend on `StateStore` only.

What is stored, and why each operation has the shape it has:

- **enrollments**: user → TOTP secret (encrypted at rest by the backend with a `SecretBox`),
  created_at. `enroll(..., replace=False)` is insert-if-absent, so two admins enrolling one user
  at once cannot both think they won.
- **last accepted counter** per user: `accept_counter` is a compare-and-set ("store only if
  greater"), the one operation that decides whether a code is used; two replicas racing on one
  code cannot both succeed (RFC 6238 §5.2).
- **failures** per (user, client address) with timestamps, and **lockouts** per (user, address)
  or per user everywhere (address None), each with an end time.
- **grants**: class → expires_at, held per session id and, for `stepup.scope: client`, per
  (user, client address) so that the same user's other and later sessions from that client
  are covered too.

Times are unix seconds (float). Methods that filter by time take `now`; when it is omitted the
backend's injected clock is used. Every method raises `StateUnavailable` when the store cannot
be read or written, so callers can fail closed (DESIGN §3: ERROR 58000 for sensitive statements).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pgguard.errors import StateUnavailable
from pgguard.stepup.lockout import FailureCounts

__all__ = [
    "Enrollment",
    "FailureCounts",
    "Grant",
    "Lockout",
    "SecretKeyError",
    "StateStore",
    "StateUnavailable",
]


class SecretKeyError(StateUnavailable):
    """The TOTP secrets cannot be decrypted with the configured key (PGGUARD_SECRET_KEY or
    secrets.key_file), or the key itself is unusable. Never guessed around: a wrong key would
    otherwise produce codes that never match."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    user: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Lockout:
    user: str
    client_addr: str | None  # None: the user is locked from every address
    until: float


@dataclass(frozen=True, slots=True)
class Grant:
    """One granted class. Exactly one of session_id / client_addr is set."""

    user: str
    step_class: str
    expires_at: float
    session_id: str | None = None
    client_addr: str | None = None


@runtime_checkable
class StateStore(Protocol):
    # -- life cycle -------------------------------------------------------------------------

    async def check(self) -> None:
        """Round trip to the store (for /readyz); raises StateUnavailable."""

    async def close(self) -> None:
        """Release the backend's resources; idempotent."""

    # -- enrollments ------------------------------------------------------------------------

    async def enroll(self, user: str, secret: str, created_at: float, *,
                     replace: bool = False) -> bool:
        """Store `secret` for `user`. Without `replace`, an existing enrollment is kept and
        False returned; with it, the old secret is overwritten. True when stored."""

    async def secret_for(self, user: str) -> str | None:
        """The user's decrypted TOTP secret, or None when not enrolled. A wrong key raises
        SecretKeyError."""

    async def is_enrolled(self, user: str) -> bool:
        """Cheap check without decrypting (the proxy asks before holding a statement)."""

    async def revoke(self, user: str) -> bool:
        """Remove the user's enrollment; True if there was one."""

    async def enrollments(self) -> list[Enrollment]:
        """Every enrolled user with its enrollment time, sorted by user."""

    # -- used codes -------------------------------------------------------------------------

    async def last_counter(self, user: str) -> int | None:
        """The last accepted time-step counter, or None."""

    async def accept_counter(self, user: str, counter: int) -> bool:
        """Atomically store `counter` if it is greater than the last accepted one. True if this
        call stored it (the code is now used); False if an equal or later one was there."""

    # -- failures and lockouts --------------------------------------------------------------

    async def record_failure(self, user: str, client_addr: str, at: float,
                             since: float) -> FailureCounts:
        """Record one bad code and count this user's failures after `since` (the window start),
        from this address and from all addresses, the new one included. Older failures of the
        user may be pruned."""

    async def clear_failures(self, user: str, client_addr: str) -> None:
        """Forget this address's failures for the user (after a success)."""

    async def add_lockout(self, user: str, client_addr: str | None, until: float) -> None:
        """Lock `user` from `client_addr` (None: everywhere) until `until`; an existing lockout
        is extended, never shortened."""

    async def locked_until(self, user: str, client_addr: str,
                           now: float | None = None) -> float | None:
        """The latest end of the lockouts in force for this user at this address (its own and
        the user-wide one), or None."""

    async def lockouts(self, now: float | None = None) -> list[Lockout]:
        """Lockouts in force, sorted by user then address."""

    async def unlock(self, user: str) -> int:
        """Remove every lockout and failure of `user` (an administrator's decision); returns
        the number of lockouts removed."""

    # -- grants -----------------------------------------------------------------------------

    async def add_grants(self, session_ids: Iterable[str], user: str, client_addr: str | None,
                         grants: Mapping[str, float]) -> None:
        """Record `grants` ({class: expires_at}) for each session in `session_ids`, and, when
        `client_addr` is given (scope client), for (user, client_addr). An existing grant of a
        class is extended, never shortened."""

    async def grants_for(self, session_id: str, *, user: str | None = None,
                         client_addr: str | None = None,
                         now: float | None = None) -> dict[str, float]:
        """{class: expires_at} in force for the session; with `user` and `client_addr`, also
        the (user, client address) grants (scope client), the later expiry winning. Expired
        grants are left out."""

    async def drop_session_grants(self, session_id: str) -> None:
        """Forget a session's own grants (the session ended)."""

    async def grants(self, now: float | None = None) -> list[Grant]:
        """Every grant in force, sorted by user, then session/address, then class."""

    async def revoke_grants(self, user: str, client_addr: str | None = None) -> int:
        """Remove the user's grants (only those tied to `client_addr` when given, session grants
        included); returns how many were removed."""

    # -- housekeeping -----------------------------------------------------------------------

    async def prune(self, now: float | None = None, failure_horizon: float = 86400.0) -> None:
        """Delete expired grants and lockouts, and failures older than `failure_horizon`
        seconds."""
