"""HoldRegistry (release, timeout, cancel, disconnect; observers) and GrantBook (scopes, expiry)."""

from __future__ import annotations

import asyncio

import pytest

from pgguard.classify import StatementClass as C
from pgguard.proxy.grants import GrantBook
from pgguard.proxy.holds import HoldOutcome, HoldRegistry

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_release_ends_the_wait_and_reports_once():
    ended = []

    async def main():
        reg = HoldRegistry()
        reg.on_end = lambda hold, outcome, secs: ended.append((hold.session_id, outcome))
        hold = reg.open("s1", "alice", "10.0.0.1", ("pii",), "pii: public.users.email")
        assert [h.session_id for h in reg.pending()] == ["s1"]
        asyncio.get_running_loop().call_later(0.05, reg.end, "s1", HoldOutcome.RELEASED, 7)
        outcome = await reg.wait(hold, 5)
        assert outcome is HoldOutcome.RELEASED and hold.released_by == 7
        assert len(reg) == 0
        assert not reg.end("s1", HoldOutcome.CANCEL)  # nothing left to end

    run(main())
    assert ended == [("s1", HoldOutcome.RELEASED)]


def test_timeout():
    async def main():
        reg = HoldRegistry()
        hold = reg.open("s1", "alice", "a", ("write",), "write: t")
        assert await reg.wait(hold, 0.05) is HoldOutcome.TIMEOUT
        assert len(reg) == 0

    run(main())


def test_cancelled_waiter_counts_as_disconnect():
    ended = []

    async def main():
        reg = HoldRegistry()
        reg.on_end = lambda hold, outcome, secs: ended.append(outcome)
        hold = reg.open("s1", "alice", "a", ("pii",), "pii: x")
        task = asyncio.create_task(reg.wait(hold, 5))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(reg) == 0

    run(main())
    assert ended == [HoldOutcome.DISCONNECT]


def test_one_hold_per_session():
    async def main():
        reg = HoldRegistry()
        reg.open("s1", "alice", "a", ("pii",), "")
        with pytest.raises(RuntimeError):
            reg.open("s1", "alice", "a", ("pii",), "")

    run(main())


def test_grants_by_session_and_by_client_expire():
    book = GrantBook()
    book.add(["s1"], "alice", None, {C.PII: 100.0})
    book.add(["s2"], "alice", "10.0.0.1", {C.WRITE: 50.0})
    assert book.for_session("s1", "alice", "10.0.0.9", now=10) == {C.PII: 100.0}
    # client scope covers a new session of the same user from the same address…
    assert book.for_session("s9", "alice", "10.0.0.1", now=10) == {C.WRITE: 50.0}
    # …but not another user or another address
    assert book.for_session("s9", "bob", "10.0.0.1", now=10) == {}
    assert book.for_session("s9", "alice", "10.0.0.2", now=10) == {}
    assert book.for_session("s2", "alice", "10.0.0.1", now=60) == {}  # expired
    book.prune(now=60)
    assert book.for_session("s1", "alice", "x", now=60) == {C.PII: 100.0}
    book.drop_session("s1")
    assert book.for_session("s1", "alice", "x", now=60) == {}


def test_grants_only_extend():
    book = GrantBook()
    book.add(["s1"], "alice", None, {C.PII: 100.0})
    book.add(["s1"], "alice", None, {C.PII: 40.0})
    assert book.for_session("s1", "alice", "x", now=0) == {C.PII: 100.0}
