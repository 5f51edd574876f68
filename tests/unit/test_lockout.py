"""Lockout (DESIGN §5 `stepup.lockout`, §6): the pure arithmetic, then the verification service
doing it against a real SQLite store file (no sleeping: `now` is injected everywhere)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pyotp
import pytest

from pgguard.state.secrets import SecretBox
from pgguard.state.sqlite import SqliteStore
from pgguard.state.store import StateStore
from pgguard.stepup.lockout import FailureCounts, LockoutPolicy, lockouts_after_failure
from pgguard.stepup.service import AttemptResult, StepUpVerifier

T = TypeVar("T")
KEY = "k" * 40
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
T0 = 1_700_000_010.0
A1, A2 = "10.0.0.1", "10.0.0.2"


# -- pure arithmetic ----------------------------------------------------------------------------

def test_defaults_are_those_of_design_5() -> None:
    p = LockoutPolicy()
    assert (p.failures, p.window, p.duration, p.user_failures) == (5, 300.0, 300.0, 20)


def test_fifth_failure_from_one_address_locks_that_address() -> None:
    p = LockoutPolicy()
    assert not lockouts_after_failure(p, FailureCounts(4, 4), T0).any
    new = lockouts_after_failure(p, FailureCounts(5, 5), T0)
    assert new.address_until == T0 + 300 and new.user_until is None


def test_user_ceiling_locks_everywhere() -> None:
    p = LockoutPolicy()
    new = lockouts_after_failure(p, FailureCounts(address=1, user=20), T0)
    assert new.user_until == T0 + 300 and new.address_until is None
    assert not lockouts_after_failure(p, FailureCounts(1, 19), T0).any


def test_custom_policy() -> None:
    p = LockoutPolicy(failures=2, window=60, duration=900, user_failures=3)
    new = lockouts_after_failure(p, FailureCounts(2, 3), T0)
    assert new.address_until == new.user_until == T0 + 900
    assert p.window_start(T0) == T0 - 60


@pytest.mark.parametrize("kwargs", [{"failures": 0}, {"user_failures": 0}, {"window": 0},
                                    {"duration": -1}])
def test_nonsense_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LockoutPolicy(**kwargs)  # type: ignore[arg-type]


# -- the service against a real store -----------------------------------------------------------

def run(factory: Callable[[StateStore], Awaitable[T]], path: Path) -> T:
    async def main() -> T:
        store = await SqliteStore.open(path, SecretBox(KEY))
        try:
            return await asyncio.wait_for(factory(store), 20)
        finally:
            await store.close()
    return asyncio.run(main())


def code_at(t: float) -> str:
    return pyotp.TOTP(SECRET).at(t)


def wrong_at(t: float) -> str:
    valid = {code_at(t + 30 * k) for k in (-1, 0, 1)}
    return next(f"{n:06d}" for n in range(1_000_000) if f"{n:06d}" not in valid)


async def enrolled(store: StateStore) -> StepUpVerifier:
    await store.enroll("alice", SECRET, T0 - 100)
    return StepUpVerifier(store)


def test_five_bad_codes_lock_that_address_and_not_another(tmp_path: Path) -> None:
    async def scenario(store: StateStore) -> None:
        v = await enrolled(store)
        for i in range(5):
            out = await v.attempt("alice", A1, wrong_at(T0), T0 + i)
            assert out.result is AttemptResult.BAD_CODE and out.http_status == 401
        assert out.locked_until == T0 + 4 + 300  # the 5th failure started the lockout
        # Even the right code is refused now, with 429, and that is not another failure.
        locked = await v.attempt("alice", A1, code_at(T0 + 10), T0 + 10)
        assert locked.result is AttemptResult.LOCKED and locked.http_status == 429
        assert locked.locked_until == T0 + 4 + 300
        # Another address of the same user is not locked.
        ok = await v.attempt("alice", A2, code_at(T0 + 10), T0 + 10)
        assert ok.result is AttemptResult.SUCCESS
        # The lockout ends after `duration`.
        after = T0 + 4 + 300 + 1
        assert (await v.attempt("alice", A1, code_at(after), after)).result \
            is AttemptResult.SUCCESS
    run(scenario, tmp_path / "s.db")


def test_failures_outside_the_window_do_not_count(tmp_path: Path) -> None:
    async def scenario(store: StateStore) -> None:
        v = await enrolled(store)
        for i in range(4):
            await v.attempt("alice", A1, wrong_at(T0), T0 + i)
        later = T0 + 3 + 301  # the first four are out of the 5-minute window
        out = await v.attempt("alice", A1, wrong_at(later), later)
        assert out.result is AttemptResult.BAD_CODE and out.locked_until is None
        assert (await v.attempt("alice", A1, code_at(later), later)).ok
    run(scenario, tmp_path / "s.db")


def test_success_clears_that_address_failures(tmp_path: Path) -> None:
    async def scenario(store: StateStore) -> None:
        v = await enrolled(store)
        for i in range(4):
            await v.attempt("alice", A1, wrong_at(T0), T0 + i)
        assert (await v.attempt("alice", A1, code_at(T0), T0 + 5)).ok
        for i in range(4):  # four more: would be 8 without the reset
            out = await v.attempt("alice", A1, wrong_at(T0 + 40), T0 + 40 + i)
            assert out.result is AttemptResult.BAD_CODE and out.locked_until is None
        assert (await store.locked_until("alice", A1, T0 + 50)) is None
    run(scenario, tmp_path / "s.db")


def test_user_failures_from_many_addresses_lock_everywhere(tmp_path: Path) -> None:
    async def scenario(store: StateStore) -> None:
        v = StepUpVerifier(store, LockoutPolicy(failures=5, user_failures=8))
        await store.enroll("alice", SECRET, T0 - 100)
        n = 0
        for addr in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
            for _ in range(2):
                out = await v.attempt("alice", addr, wrong_at(T0), T0 + n)
                n += 1
        assert out.result is AttemptResult.BAD_CODE and out.locked_until == T0 + 7 + 300
        fresh = "192.0.2.9"
        locked = await v.attempt("alice", fresh, code_at(T0 + 10), T0 + 10)
        assert locked.result is AttemptResult.LOCKED
        # Other users are not affected.
        await store.enroll("bob", SECRET, T0)
        assert (await v.attempt("bob", fresh, code_at(T0 + 10), T0 + 10)).ok
    run(scenario, tmp_path / "s.db")


def test_address_lockouts_do_not_reset_the_user_ceiling(tmp_path: Path) -> None:
    """An attacker rotating addresses: each address is locked after 5, and the 20 across them
    lock the user everywhere."""
    async def scenario(store: StateStore) -> None:
        v = await enrolled(store)
        n = 0
        for k in range(4):
            for _ in range(5):
                await v.attempt("alice", f"10.1.0.{k}", wrong_at(T0), T0 + n)
                n += 1
        assert (await store.locked_until("alice", "10.9.9.9", T0 + n)) == T0 + 19 + 300
    run(scenario, tmp_path / "s.db")


def test_replays_are_not_failures(tmp_path: Path) -> None:
    async def scenario(store: StateStore) -> None:
        v = await enrolled(store)
        assert (await v.attempt("alice", A1, code_at(T0), T0)).ok
        for i in range(10):
            out = await v.attempt("alice", A1, code_at(T0), T0 + 1 + i / 10)
            assert out.result is AttemptResult.REPLAY and out.http_status == 409
        assert (await store.locked_until("alice", A1, T0 + 2)) is None
        assert (await v.attempt("alice", A1, code_at(T0 + 30), T0 + 30)).ok
    run(scenario, tmp_path / "s.db")


def test_not_enrolled(tmp_path: Path) -> None:
    async def scenario(store: StateStore) -> None:
        v = StepUpVerifier(store)
        out = await v.attempt("carol", A1, "123456", T0)
        assert out.result is AttemptResult.NOT_ENROLLED and not out.ok
    run(scenario, tmp_path / "s.db")


def test_another_users_code_is_a_bad_code_and_counts(tmp_path: Path) -> None:
    async def scenario(store: StateStore) -> None:
        v = await enrolled(store)
        bob_secret = pyotp.random_base32(32)
        await store.enroll("bob", bob_secret, T0)
        bob_code = pyotp.TOTP(bob_secret).at(T0)
        if bob_code in {code_at(T0 + 30 * k) for k in (-1, 0, 1)}:
            pytest.fail("random secret collided; rerun")
        out = await v.attempt("alice", A1, bob_code, T0)
        assert out.result is AttemptResult.BAD_CODE
        counts = await store.record_failure("alice", A1, T0 + 1, T0 - 300)
        assert counts.address == 2  # the bad code above was recorded
    run(scenario, tmp_path / "s.db")


def test_success_records_the_counter(tmp_path: Path) -> None:
    async def scenario(store: StateStore) -> None:
        v = await enrolled(store)
        out = await v.attempt("alice", A1, code_at(T0 + 30), T0)
        assert out.ok and out.counter == int((T0 + 30) // 30)
        assert await store.last_counter("alice") == out.counter
        # The current step's code is older than the accepted one: replay.
        assert (await v.attempt("alice", A1, code_at(T0), T0)).result is AttemptResult.REPLAY
    run(scenario, tmp_path / "s.db")


def test_lockout_survives_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    async def lock(store: StateStore) -> None:
        v = await enrolled(store)
        for i in range(5):
            await v.attempt("alice", A1, wrong_at(T0), T0 + i)

    async def check(store: StateStore) -> AttemptResult:
        return (await StepUpVerifier(store).attempt("alice", A1, code_at(T0 + 60), T0 + 60)).result

    run(lock, path)
    assert run(check, path) is AttemptResult.LOCKED


# -- grant arithmetic ---------------------------------------------------------------------------

def test_success_grants_each_positive_ttl_class_for_its_own_ttl() -> None:
    from pgguard.stepup.grants import grants_after_success, still_granted

    g = grants_after_success({"pii": 1800.0, "write": 600.0, "unknown": 0.0}, T0)
    assert g == {"pii": T0 + 1800, "write": T0 + 600}
    assert grants_after_success({"ddl": 0.0, "admin": 0.0}, T0) == {}
    assert still_granted(g, T0 + 600) == {"pii": T0 + 1800}
    assert still_granted(g, T0 + 1800) == {}
