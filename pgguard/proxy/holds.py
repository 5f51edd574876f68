"""The hold registry: statements waiting for their session to step up (DESIGN §6).

A held statement waits here until it is released (a successful step-up), times out, is
cancelled (CancelRequest with the session's key), or its session ends (disconnect, shutdown).
Each end is reported to the `on_end` observer (audit and metrics). The registry is
cross-session state behind a small class, so a shared store can replace it later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Hold", "HoldOutcome", "HoldRegistry", "hold_hint"]


class HoldOutcome(StrEnum):
    RELEASED = "released"
    TIMEOUT = "timeout"
    CANCEL = "cancel"
    DISCONNECT = "disconnect"
    SHUTDOWN = "shutdown"


@dataclass(slots=True, eq=False)
class Hold:
    session_id: str
    user: str
    client_addr: str
    classes: tuple[str, ...]
    triggers: str
    since: float  # wall clock (time.time()), for the API
    started: float  # monotonic, for durations
    future: asyncio.Future[HoldOutcome] = field(repr=False)
    released_by: object | None = None  # the stepup.success audit event (EventRef) that released it


def hold_hint(session_id: str, url: str) -> str:
    return f"run `pgguard stepup {session_id}` or open {url}"


class HoldRegistry:
    def __init__(self) -> None:
        self._holds: dict[str, Hold] = {}
        self.on_start: Callable[[Hold], None] = lambda hold: None
        self.on_end: Callable[[Hold, HoldOutcome, float], None] = lambda hold, o, secs: None

    def __len__(self) -> int:
        return len(self._holds)

    def pending(self) -> list[Hold]:
        return sorted(self._holds.values(), key=lambda h: h.since)

    def get(self, session_id: str) -> Hold | None:
        return self._holds.get(session_id)

    def open(self, session_id: str, user: str, client_addr: str, classes: tuple[str, ...],
             triggers: str) -> Hold:
        if session_id in self._holds:
            raise RuntimeError(f"session {session_id} already holds a statement")
        hold = Hold(session_id, user, client_addr, classes, triggers, time.time(),
                    time.monotonic(), asyncio.get_running_loop().create_future())
        self._holds[session_id] = hold
        self.on_start(hold)
        return hold

    async def wait(self, hold: Hold, timeout: float) -> HoldOutcome:  # noqa: ASYNC109
        """Wait for the end of `hold`; it leaves the registry whatever happens."""
        try:
            return await asyncio.wait_for(asyncio.shield(hold.future), timeout)
        except TimeoutError:
            self._finish(hold, HoldOutcome.TIMEOUT)
            return hold.future.result()  # TIMEOUT, or what won the race with the deadline
        except asyncio.CancelledError:
            self._finish(hold, HoldOutcome.DISCONNECT)
            raise

    def _finish(self, hold: Hold, outcome: HoldOutcome) -> None:
        if self._holds.get(hold.session_id) is not hold:
            return
        del self._holds[hold.session_id]
        if not hold.future.done():
            hold.future.set_result(outcome)
        self.on_end(hold, outcome, time.monotonic() - hold.started)

    def end(self, session_id: str, outcome: HoldOutcome,
            released_by: object | None = None) -> bool:
        """Resolve the session's hold (release, cancel, disconnect, shutdown)."""
        hold = self._holds.get(session_id)
        if hold is None:
            return False
        hold.released_by = released_by
        self._finish(hold, outcome)
        return True
