"""Grant arithmetic (DESIGN §6): what a successful step-up grants, and until when. Pure.

A success grants every class of the role's `step_up` whose ttl is above 0, each for its own
ttl from the moment of success. `0s` classes get nothing lasting: the success only releases the
statement that is held (every later such statement needs a fresh code).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

__all__ = ["grants_after_success", "still_granted"]

K = TypeVar("K")


def grants_after_success(step_up: Mapping[K, float], now: float) -> dict[K, float]:
    """{class: expires_at} for a role's `step_up` ({class: ttl seconds}) at `now`."""
    return {cls: now + ttl for cls, ttl in step_up.items() if ttl > 0}


def still_granted(grants: Mapping[K, float], now: float) -> dict[K, float]:
    """The grants in force at `now` (expires_at strictly after it)."""
    return {cls: exp for cls, exp in grants.items() if exp > now}
