"""The step-up verification service (DESIGN §6): one attempt of one code, with the store's help.

    verifier = StepUpVerifier(store, LockoutPolicy(...))
    outcome = await verifier.attempt(user, client_addr, code, now)
    if outcome.result is AttemptResult.SUCCESS:
        await store.add_grants(session_ids, user, client_addr, {cls: now + ttl, ...})

Order of checks, and why:
1. lockout first: a locked (user, address) gets 429 without the code being looked at, so a
   guesser learns nothing and a locked attempt is not another failure;
2. enrollment: no secret → NOT_ENROLLED (nothing to count: there is no code to guess);
3. the code against the secret at `now`, ±1 step, after the last accepted counter;
4. BAD → one failure recorded; reaching a threshold stores the lockout(s) (LockoutPolicy);
   REPLAY → not a failure (a user pressing Enter twice must not lock themselves out);
5. OK → the store's compare-and-set on the counter decides: losing it (another replica or a
   concurrent request accepted this code first) is a REPLAY; winning clears this address's
   failures.

This module is async but does no I/O of its own: it talks to the injected `StateStore` only
(never a backend), and the clock is the `now` argument. Store errors (`StateUnavailable`)
propagate: the caller fails closed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pgguard.state.store import StateStore
from pgguard.stepup.lockout import LockoutPolicy, lockouts_after_failure
from pgguard.stepup.totp import CodeVerdict, verify_code

__all__ = ["AttemptResult", "Outcome", "StepUpVerifier"]


class AttemptResult(enum.Enum):
    """Values are the `result` label of `pgguard_stepup_total` and the reason of the
    `stepup.failure` audit event (DESIGN §7)."""

    SUCCESS = "success"
    BAD_CODE = "bad_code"
    REPLAY = "replay"
    LOCKED = "locked"
    NOT_ENROLLED = "not_enrolled"

    @property
    def http_status(self) -> int:
        """The status of `POST /api/v1/sessions/{id}/stepup` (DESIGN §6). NOT_ENROLLED has no
        status of its own there: 401, as a bad code, unless the caller says otherwise."""
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    AttemptResult.SUCCESS: 200,
    AttemptResult.BAD_CODE: 401,
    AttemptResult.REPLAY: 409,
    AttemptResult.LOCKED: 429,
    AttemptResult.NOT_ENROLLED: 401,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    result: AttemptResult
    counter: int | None = None         # SUCCESS: the accepted time step
    locked_until: float | None = None  # LOCKED, or BAD_CODE when this failure started a lockout

    @property
    def ok(self) -> bool:
        return self.result is AttemptResult.SUCCESS

    @property
    def http_status(self) -> int:
        return self.result.http_status

    @property
    def message(self) -> str:
        """The `{"error": …}` text for the API (no secret, no code)."""
        return _MESSAGES[self.result]


_MESSAGES = {
    AttemptResult.SUCCESS: "ok",
    AttemptResult.BAD_CODE: "invalid code",
    AttemptResult.REPLAY: "code already used; wait for the next one",
    AttemptResult.LOCKED: "too many failed attempts; try again later",
    AttemptResult.NOT_ENROLLED: "no authenticator enrolled for this user",
}


class StepUpVerifier:
    """Verifies codes against a `StateStore`; stateless itself, so one instance serves all."""

    __slots__ = ("lockout", "store")

    def __init__(self, store: StateStore, lockout: LockoutPolicy | None = None) -> None:
        self.store = store
        self.lockout = lockout or LockoutPolicy()

    async def attempt(self, user: str, client_addr: str, code: str, now: float) -> Outcome:
        """One step-up attempt by `user` from `client_addr` with `code` at `now` (unix s).
        Raises StateUnavailable (SecretKeyError) when the store cannot answer."""
        store = self.store
        until = await store.locked_until(user, client_addr, now)
        if until is not None:
            return Outcome(AttemptResult.LOCKED, locked_until=until)
        secret = await store.secret_for(user)
        if secret is None:
            return Outcome(AttemptResult.NOT_ENROLLED)
        check = verify_code(secret, code, now, await store.last_counter(user))
        if check.verdict is CodeVerdict.REPLAY:
            return Outcome(AttemptResult.REPLAY)
        if check.verdict is CodeVerdict.BAD or check.counter is None:
            return await self._failed(user, client_addr, now)
        if not await store.accept_counter(user, check.counter):
            return Outcome(AttemptResult.REPLAY)  # a concurrent attempt used this code first
        await store.clear_failures(user, client_addr)
        return Outcome(AttemptResult.SUCCESS, counter=check.counter)

    async def _failed(self, user: str, client_addr: str, now: float) -> Outcome:
        counts = await self.store.record_failure(user, client_addr, now,
                                                 self.lockout.window_start(now))
        new = lockouts_after_failure(self.lockout, counts, now)
        if new.address_until is not None:
            await self.store.add_lockout(user, client_addr, new.address_until)
        if new.user_until is not None:
            await self.store.add_lockout(user, None, new.user_until)
        until = max((u for u in (new.address_until, new.user_until) if u is not None),
                    default=None)
        return Outcome(AttemptResult.BAD_CODE, locked_until=until)
