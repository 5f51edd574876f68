"""The SQLite state store on a real file (DESIGN §2, §6, §8): persistence across reopening,
the used-counter compare-and-set under concurrency from two store instances, file modes, failure
modes (StateUnavailable) and the key of the secrets at rest."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from pgguard.errors import ConfigError
from pgguard.state.factory import open_state_store, sqlite_path
from pgguard.state.secrets import SecretBox, load_secret_key
from pgguard.state.sqlite import SqliteStore
from pgguard.state.store import SecretKeyError, StateStore, StateUnavailable

T = TypeVar("T")
KEY = "correct horse battery staple 0123456789"
OTHER_KEY = "another key entirely, also long enough!!"
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
T0 = 1_700_000_000.0


def arun(coro: Awaitable[T], timeout: float = 30) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(main())


async def with_store(path: Path, fn: Callable[[StateStore], Awaitable[T]],
                     key: str = KEY) -> T:
    store = await SqliteStore.open(path, SecretBox(key))
    try:
        return await fn(store)
    finally:
        await store.close()


def test_everything_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def write(s: StateStore) -> None:
        assert await s.enroll("alice", SECRET, T0)
        assert await s.accept_counter("alice", 1000)
        await s.record_failure("alice", "10.0.0.1", T0, T0 - 300)
        await s.add_lockout("alice", "10.0.0.1", T0 + 300)
        await s.add_lockout("bob", None, T0 + 600)
        await s.add_grants(["sess1", "sess2"], "alice", "10.0.0.1",
                           {"pii": T0 + 1800, "write": T0 + 600})

    async def read(s: StateStore) -> None:
        assert await s.secret_for("alice") == SECRET
        assert await s.is_enrolled("alice") and not await s.is_enrolled("bob")
        assert [(e.user, e.created_at) for e in await s.enrollments()] == [("alice", T0)]
        assert await s.last_counter("alice") == 1000
        assert await s.locked_until("alice", "10.0.0.1", T0 + 1) == T0 + 300
        assert await s.locked_until("alice", "10.0.0.2", T0 + 1) is None
        assert await s.locked_until("bob", "anywhere", T0 + 1) == T0 + 600
        assert await s.grants_for("sess1", now=T0) == {"pii": T0 + 1800, "write": T0 + 600}
        # A new session (after a restart every session is new) of the same user from the same
        # client is covered by the client grant; from another address it is not.
        assert await s.grants_for("new", user="alice", client_addr="10.0.0.1", now=T0) == {
            "pii": T0 + 1800, "write": T0 + 600}
        assert await s.grants_for("new", user="alice", client_addr="10.0.0.9", now=T0) == {}
        assert await s.grants_for("new", user="bob", client_addr="10.0.0.1", now=T0) == {}
        counts = await s.record_failure("alice", "10.0.0.1", T0 + 2, T0 - 300)
        assert (counts.address, counts.user) == (2, 2)

    arun(with_store(path, write))
    arun(with_store(path, read))


def test_grants_expire_extend_and_are_removed(tmp_path: Path) -> None:
    async def scenario(s: StateStore) -> None:
        await s.add_grants(["s1"], "alice", None, {"pii": T0 + 100, "write": T0 + 10})
        assert await s.grants_for("s1", now=T0 + 50) == {"pii": T0 + 100}
        assert await s.grants_for("s1", now=T0 + 100) == {}
        # Extending keeps the later expiry; a shorter grant does not shorten it.
        await s.add_grants(["s1"], "alice", None, {"pii": T0 + 200})
        await s.add_grants(["s1"], "alice", None, {"pii": T0 + 150})
        assert await s.grants_for("s1", now=T0) == {"pii": T0 + 200, "write": T0 + 10}
        # No client_addr (scope session): nothing for other sessions.
        assert await s.grants_for("s2", user="alice", client_addr="10.0.0.1", now=T0) == {}
        # An empty session id never matches the client rows.
        await s.add_grants(["s3"], "alice", "10.0.0.1", {"ddl": T0 + 50})
        assert await s.grants_for("", now=T0) == {}
        grants = await s.grants(now=T0)
        assert {(g.session_id, g.client_addr, g.step_class) for g in grants} == {
            ("s1", None, "pii"), ("s1", None, "write"), ("s3", None, "ddl"),
            (None, "10.0.0.1", "ddl")}
        await s.drop_session_grants("s1")
        assert await s.grants_for("s1", now=T0) == {}
        assert await s.revoke_grants("alice", "10.0.0.1") == 2
        assert await s.grants(now=T0) == []
        await s.add_grants(["s4"], "alice", None, {"pii": T0 + 5})
        await s.prune(now=T0 + 10)
        assert await s.grants(now=0) == []
    arun(with_store(tmp_path / "s.db", scenario))


def test_lockouts_listing_unlock_and_prune(tmp_path: Path) -> None:
    async def scenario(s: StateStore) -> None:
        await s.add_lockout("alice", "10.0.0.1", T0 + 300)
        await s.add_lockout("alice", "10.0.0.1", T0 + 100)  # never shortened
        await s.add_lockout("bob", None, T0 + 50)
        assert [(lk.user, lk.client_addr, lk.until) for lk in await s.lockouts(now=T0)] == [
            ("alice", "10.0.0.1", T0 + 300), ("bob", None, T0 + 50)]
        assert [lk.user for lk in await s.lockouts(now=T0 + 60)] == ["alice"]
        assert await s.unlock("alice") == 1
        assert await s.locked_until("alice", "10.0.0.1", T0) is None
        await s.prune(now=T0 + 60)
        assert await s.lockouts(now=0) == []
    arun(with_store(tmp_path / "s.db", scenario))


def test_enroll_replace_and_revoke(tmp_path: Path) -> None:
    async def scenario(s: StateStore) -> None:
        assert await s.enroll("alice", SECRET, T0)
        assert not await s.enroll("alice", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", T0 + 1)
        assert await s.secret_for("alice") == SECRET
        assert await s.enroll("alice", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", T0 + 1, replace=True)
        assert await s.secret_for("alice") == "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        assert await s.revoke("alice") and not await s.revoke("alice")
        assert await s.secret_for("alice") is None
    arun(with_store(tmp_path / "s.db", scenario))


def test_counter_compare_and_set_two_instances_racing(tmp_path: Path) -> None:
    """Two stores on one file (two replicas) race to accept the same counters: for every counter
    exactly one wins, and a smaller counter never overwrites a larger one."""
    path = tmp_path / "s.db"

    async def scenario() -> None:
        a = await SqliteStore.open(path, SecretBox(KEY))
        b = await SqliteStore.open(path, SecretBox(KEY))
        try:
            for counter in range(1, 101):
                wins = await asyncio.gather(*(s.accept_counter("alice", counter)
                                              for s in (a, b, a, b)))
                assert sum(wins) == 1, (counter, wins)
            assert not await a.accept_counter("alice", 50)
            assert await b.last_counter("alice") == 100
        finally:
            await a.close()
            await b.close()
    arun(scenario(), 60)


def test_counter_compare_and_set_two_processes_racing(tmp_path: Path) -> None:
    """The same with two OS processes hammering one file: every counter is won exactly once."""
    path = tmp_path / "s.db"
    arun(with_store(path, lambda s: s.check()))
    script = f"""
import asyncio, sys
from pgguard.state.secrets import SecretBox
from pgguard.state.sqlite import SqliteStore
async def main():
    s = await SqliteStore.open({str(path)!r}, SecretBox({KEY!r}))
    won = [c for c in range(1, 201) if await s.accept_counter("alice", c)]
    await s.close()
    print(" ".join(map(str, won)))
asyncio.run(main())
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    won = [int(x) for out in outs for x in out.split()]
    assert len(won) == len(set(won))  # no counter accepted twice
    assert max(won) == 200


def test_file_mode_0600_and_parent_created(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.db"
    old = os.umask(0o022)
    try:
        arun(with_store(path, lambda s: s.enroll("alice", SECRET, T0)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for sidecar in path.parent.iterdir():  # -wal / -shm, when still there
        assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600, sidecar
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    arun(with_store(path, lambda s: s.check()))
    import sqlite3
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unwritable_path_is_state_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(StateUnavailable, match="not-a-dir"):
        arun(SqliteStore.open(blocker / "state.db", SecretBox(KEY)))


def test_uncreatable_file_is_state_unavailable() -> None:
    """A store whose file cannot be created (/proc refuses new files, even to root) fails
    closed with StateUnavailable, not an OSError."""
    with pytest.raises(StateUnavailable):
        arun(SqliteStore.open(Path("/proc/self/pgguard-state.db"), SecretBox(KEY)))


def test_not_a_database_is_state_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateUnavailable, match="not a database"):
        arun(SqliteStore.open(path, SecretBox(KEY)))


def test_store_closed_is_state_unavailable(tmp_path: Path) -> None:
    async def scenario() -> None:
        s = await SqliteStore.open(tmp_path / "s.db", SecretBox(KEY))
        await s.close()
        await s.close()  # idempotent
        with pytest.raises(StateUnavailable):
            await s.grants_for("x")
    arun(scenario())


def test_wrong_key_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    arun(with_store(path, lambda s: s.enroll("alice", SECRET, T0)))
    with pytest.raises(SecretKeyError, match="different key"):
        arun(with_store(path, lambda s: s.secret_for("alice"), key=OTHER_KEY))
    # The right key still works afterwards: nothing was overwritten.
    assert arun(with_store(path, lambda s: s.secret_for("alice"))) == SECRET


def test_secret_copied_to_another_user_does_not_decrypt(tmp_path: Path) -> None:
    import sqlite3
    path = tmp_path / "s.db"
    arun(with_store(path, lambda s: s.enroll("alice", SECRET, T0)))
    db = sqlite3.connect(path)
    db.execute("INSERT INTO enrollments SELECT 'mallory', secret, created_at FROM enrollments")
    db.commit()
    db.close()
    with pytest.raises(SecretKeyError):
        arun(with_store(path, lambda s: s.secret_for("mallory")))


def test_secret_is_not_stored_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    arun(with_store(path, lambda s: s.enroll("alice", SECRET, T0)))
    for f in tmp_path.iterdir():
        assert SECRET.encode() not in f.read_bytes()


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "pgguard.key"
    box1 = load_secret_key(key_file, env={})
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    blob = box1.encrypt("alice", SECRET)
    box2 = load_secret_key(key_file, env={})
    assert box2.decrypt("alice", blob) == SECRET
    # PGGUARD_SECRET_KEY wins over the file.
    box3 = load_secret_key(key_file, env={"PGGUARD_SECRET_KEY": OTHER_KEY})
    with pytest.raises(SecretKeyError, match="PGGUARD_SECRET_KEY"):
        box3.decrypt("alice", blob)


def test_short_key_is_refused() -> None:
    with pytest.raises(SecretKeyError, match="at least 32"):
        load_secret_key(None, env={"PGGUARD_SECRET_KEY": "short"})


def test_unreadable_key_file_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SecretKeyError, match="key file"):
        load_secret_key(blocker / "pgguard.key", env={})


# -- URL forms (DESIGN §8) ----------------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///state.db", "/etc/pgguard/state.db"),
    ("sqlite:///sub/state.db", "/etc/pgguard/sub/state.db"),
    ("sqlite:////var/lib/pgguard/state.db", "/var/lib/pgguard/state.db"),
    ("state.db", "/etc/pgguard/state.db"),
    ("/var/lib/pgguard/state.db", "/var/lib/pgguard/state.db"),
])
def test_sqlite_url_forms(url: str, expected: str) -> None:
    assert sqlite_path(url, "/etc/pgguard") == Path(expected)


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql://pgguard@db/state", "not yet supported"),
    ("postgres://db/state", "not yet supported"),
    ("mysql://db/x", "unsupported URL scheme"),
    ("sqlite://", "expected sqlite:///"),
    ("sqlite://host/x.db", "expected sqlite:///"),
    ("", "empty"),
])
def test_bad_state_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sqlite_path(url, "/etc/pgguard")


def test_open_state_store_relative_to_base_dir(tmp_path: Path) -> None:
    async def scenario() -> None:
        s = await open_state_store("sqlite:///data/state.db", base_dir=tmp_path,
                                   key_file="secret/pgguard.key", env={})
        try:
            await s.check()
        finally:
            await s.close()
    arun(scenario())
    assert (tmp_path / "data" / "state.db").is_file()
    assert (tmp_path / "secret" / "pgguard.key").is_file()
