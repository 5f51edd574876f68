"""Lockout arithmetic (DESIGN §5 `stepup.lockout`, §6). Pure: counts and the clock come in.

Two ceilings, both counted over the same sliding `window`:
- `failures` bad codes for one user from one client address lock that user *for that
  address* for `duration` (someone at that address is guessing);
- `user_failures` bad codes for one user from all addresses together lock the user
  *everywhere* for `duration` (a guesser spreading attempts over many addresses).

A lockout is stored as its own record with an end time, separate from the failures, so it
survives restarts and ends exactly when it said it would. Failures are not cleared when a
lockout starts: clearing them would let an attacker at four addresses reset the user-wide
count each time one address got locked. A success clears that address's failures only.
Replays are not failures (DESIGN §6).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FailureCounts", "LockoutPolicy", "NewLockouts", "lockouts_after_failure"]


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    failures: int = 5           # per (user, client address) …
    window: float = 300.0       # … within this many seconds
    duration: float = 300.0     # how long a lockout lasts
    user_failures: int = 20     # per user, from all addresses, within `window`

    def __post_init__(self) -> None:
        if self.failures < 1 or self.user_failures < 1:
            raise ValueError("lockout thresholds must be at least 1")
        if self.window <= 0 or self.duration <= 0:
            raise ValueError("lockout window and duration must be positive")

    def window_start(self, now: float) -> float:
        """Failures at or before this instant no longer count."""
        return now - self.window


@dataclass(frozen=True, slots=True)
class FailureCounts:
    """Failures inside the window, the one just recorded included."""

    address: int  # this user from this client address
    user: int     # this user from every address


@dataclass(frozen=True, slots=True)
class NewLockouts:
    """Lockouts to store after a failure: an end time, or None for no new lockout."""

    address_until: float | None = None
    user_until: float | None = None

    @property
    def any(self) -> bool:
        return self.address_until is not None or self.user_until is not None


def lockouts_after_failure(policy: LockoutPolicy, counts: FailureCounts,
                           now: float) -> NewLockouts:
    """Which lockouts this failure starts. Reaching the threshold locks (the 5th failure of 5
    locks; the 6th attempt is refused with 429 without being checked)."""
    until = now + policy.duration
    return NewLockouts(
        address_until=until if counts.address >= policy.failures else None,
        user_until=until if counts.user >= policy.user_failures else None,
    )
