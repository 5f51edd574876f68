"""The step-up flow across the pieces (DESIGN §6): the admin API calls it, it verifies the code
with the state store, records the grants, and releases the held statements in the proxy.

It sits beside app.py because it joins modules that must not import each other (admin and
proxy); everything it needs is injected.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from pgguard.config import Config
from pgguard.errors import StateUnavailable
from pgguard.observability import audit as ev
from pgguard.policy import grants_after_stepup
from pgguard.proxy.grants import GrantBook
from pgguard.proxy.holds import HoldOutcome, HoldRegistry
from pgguard.state.store import StateStore
from pgguard.stepup.service import AttemptResult, StepUpVerifier

log = structlog.get_logger("pgguard.stepup")

__all__ = ["Elevation", "SessionDirectory", "StepUpReply"]


class SessionLike(Protocol):
    id: str
    user: str
    client_addr: str


class SessionDirectory(Protocol):
    def get(self, session_id: str) -> SessionLike | None: ...
    def of_client(self, user: str, client_addr: str) -> Sequence[SessionLike]: ...


@dataclass(frozen=True, slots=True)
class StepUpReply:
    status: int
    body: dict[str, Any]


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Elevation:
    def __init__(self, config: Callable[[], Config], store: StateStore, holds: HoldRegistry,
                 sessions: SessionDirectory, grants: GrantBook, *, audit: Any = None,
                 metrics: Any = None, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._store = store
        self._holds = holds
        self._sessions = sessions
        self._grants = grants
        self._audit = audit
        self._metrics = metrics
        self._clock = clock

    def _verifier(self) -> StepUpVerifier:
        from pgguard.stepup.lockout import LockoutPolicy

        lock = self._config().stepup.lockout
        return StepUpVerifier(self._store, LockoutPolicy(
            failures=lock.failures, window=lock.window, duration=lock.duration,
            user_failures=lock.user_failures))

    def pending_holds(self) -> list[dict[str, Any]]:
        """`GET /api/v1/holds`: what is waiting, oldest first."""
        return [{"session": h.session_id, "user": h.user, "client_addr": h.client_addr,
                 "classes": list(h.classes), "triggers": h.triggers, "since": iso(h.since)}
                for h in self._holds.pending()]

    def _emit(self, event: str, **fields: Any) -> int | None:
        if self._audit is None:
            return None
        result: int | None = self._audit.emit(event, **fields)
        return result

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.stepup[result].inc()

    async def step_up(self, session_id: str, code: str, caller_addr: str) -> StepUpReply:
        """`POST /api/v1/sessions/{id}/stepup` (DESIGN §6): 200, 401, 404, 409 or 429."""
        session = self._sessions.get(session_id)
        if session is None:
            self._count("unknown_session")
            self._emit(ev.STEPUP_FAILURE, session=session_id, client_addr=caller_addr,
                       reason="unknown_session")
            return StepUpReply(404, {"error": f"no session {session_id}"})
        user = session.user
        now = self._clock()
        try:
            outcome = await self._verifier().attempt(user, caller_addr, code, now)
        except StateUnavailable as exc:
            log.error("stepup.state_unavailable", error=str(exc))
            return StepUpReply(503, {"error": "pgguard: cannot verify step-up state"})
        if not outcome.ok:
            reason = outcome.result.value
            self._count(reason)
            self._emit(ev.STEPUP_FAILURE, session=session_id, user=user, client_addr=caller_addr,
                       reason=reason)
            body: dict[str, Any] = {"error": outcome.message}
            if outcome.result is AttemptResult.LOCKED and outcome.locked_until:
                body["locked_until"] = iso(outcome.locked_until)
            return StepUpReply(outcome.http_status, body)
        cfg = self._config()
        role = cfg.policy.role_for(user)
        granted = grants_after_stepup(role, now) if role is not None else {}
        covered = [session]
        client_addr: str | None = None
        if cfg.stepup.scope == "client":
            client_addr = session.client_addr
            covered += [s for s in self._sessions.of_client(user, session.client_addr)
                        if s.id != session.id]
        ids = [s.id for s in covered]
        if granted:
            try:
                await self._store.add_grants(ids, user, client_addr,
                                             {c.value: t for c, t in granted.items()})
            except StateUnavailable as exc:
                log.error("stepup.state_unavailable", error=str(exc))
                return StepUpReply(503, {"error": "pgguard: cannot record the step-up grant"})
            self._grants.add(ids, user, client_addr, granted)
        self._count("success")
        success_id = self._emit(
            ev.STEPUP_SUCCESS, session=session_id, user=user, client_addr=caller_addr,
            sessions=ids, grants={c.value: iso(t) for c, t in granted.items()})
        released = False
        for s in covered:
            if self._holds.end(s.id, HoldOutcome.RELEASED, released_by=success_id):
                released = released or s.id == session_id
        log.info("stepup.success", session=session_id, user=user, sessions=ids,
                 released=released)
        return StepUpReply(200, {
            "session": session_id, "user": user,
            "grants": {c.value: iso(t) for c, t in granted.items()},
            "sessions": ids, "released": released})
