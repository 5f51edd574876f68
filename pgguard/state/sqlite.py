"""`SqliteStore`: the single-node state backend (DESIGN §2, §8), one SQLite file in WAL mode.

Why a dedicated worker thread: sqlite3 calls block, and a write can wait up to the busy timeout
for another process's lock (`pgguard enroll` run while the proxy serves, or two proxies on one
file). Every call therefore runs on one thread of our own (`ThreadPoolExecutor(max_workers=1)`),
which owns the connection, so the event loop never blocks and calls on one store are serialised
without a lock of ours. Measured (2 cores, load average 8): a keyed read costs ~30 µs inside
SQLite and 0.2-1 ms end to end with the thread hop; a durable (fsync'd) write ~2 ms. Running the
reads on the loop would save the hop but a write or a checkpoint can stall for the busy timeout,
so nothing runs there. Callers ask the store at step-up and decision time, never per message.

Durability: WAL with `synchronous=FULL`, so a lockout or grant written before a crash or a
restart is still there afterwards. Atomicity across processes comes from SQLite itself: the
used-counter compare-and-set is a single UPSERT with a WHERE clause, and read-modify-write
sequences run inside `BEGIN IMMEDIATE`.

The file is created with mode 0600 (SQLite gives its -wal and -shm files the same mode) and its
folder with 0700 when missing. Any sqlite3 or OS error becomes `StateUnavailable`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pgguard.state.secrets import SecretBox
from pgguard.state.store import (
    Enrollment,
    FailureCounts,
    Grant,
    Lockout,
    SecretKeyError,
    StateUnavailable,
)

__all__ = ["SqliteStore"]

T = TypeVar("T")

SCHEMA_VERSION = 1

# '' stands for "none" in key columns (SQLite primary keys treat NULLs as distinct):
# lockouts.client_addr '' = every address; grants.session_id '' = a (user, client) grant.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollments (
    user       TEXT PRIMARY KEY,
    secret     BLOB NOT NULL,          -- SecretBox blob, associated data = user
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    user    TEXT PRIMARY KEY,
    counter INTEGER NOT NULL           -- last accepted TOTP time step (RFC 6238 §5.2)
);
CREATE TABLE IF NOT EXISTS failures (
    user        TEXT NOT NULL,
    client_addr TEXT NOT NULL,
    at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_user_at ON failures (user, at);
CREATE TABLE IF NOT EXISTS lockouts (
    user        TEXT NOT NULL,
    client_addr TEXT NOT NULL,
    until       REAL NOT NULL,
    PRIMARY KEY (user, client_addr)
);
CREATE TABLE IF NOT EXISTS grants (
    session_id  TEXT NOT NULL,
    user        TEXT NOT NULL,
    client_addr TEXT NOT NULL,
    step_class  TEXT NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (session_id, user, client_addr, step_class)
);
CREATE INDEX IF NOT EXISTS grants_client ON grants (user, client_addr);
"""


class SqliteStore:
    """A `StateStore` on one SQLite file. Create with `await SqliteStore.open(path, box)`."""

    def __init__(self, path: Path, box: SecretBox, *, busy_timeout: float = 2.0,
                 call_timeout: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._box = box
        self._busy_timeout = busy_timeout
        self._call_timeout = call_timeout  # every await has a deadline (STYLE rule 8)
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgguard-state")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path, box: SecretBox, *, busy_timeout: float = 2.0,
                   call_timeout: float = 5.0,
                   clock: Callable[[], float] = time.time) -> SqliteStore:
        """Create or open the file, set up the schema, prove the key. Raises StateUnavailable
        (SecretKeyError when the key does not match the one the secrets were stored with)."""
        store = cls(Path(path), box, busy_timeout=busy_timeout, call_timeout=call_timeout,
                    clock=clock)
        try:
            await store._run(store._open_sync)
        except BaseException:
            await store.close()
            raise
        return store

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StateUnavailable(f"state store {self.path}: closed")
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._executor, self._guard, fn),
                                          self._call_timeout)
        except TimeoutError:
            raise StateUnavailable(f"state store {self.path}: no answer within "
                                   f"{self._call_timeout:g} s") from None

    def _guard(self, fn: Callable[[], T]) -> T:
        """Runs on the worker thread: maps third-party errors at the boundary (STYLE rule 4)."""
        try:
            return fn()
        except StateUnavailable:
            raise
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state store {self.path}: {exc}") from None
        except OSError as exc:
            raise StateUnavailable(f"state store {self.path}: {exc.strerror or exc}") from None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateUnavailable(f"state store {self.path}: not open")
        return self._conn

    def _open_sync(self) -> None:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Create the file ourselves so its mode is 0600 whatever the umask; SQLite would use 0644.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                               check_same_thread=True)
        self._conn = conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateUnavailable(f"state store {self.path}: cannot use WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        with _immediate(conn):
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StateUnavailable(f"state store {self.path}: written by a newer pgguard "
                                       f"(schema {row[0]})")
            check = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
            if check is None:
                conn.execute("INSERT INTO meta VALUES ('key_check', ?)", (self._box.key_check(),))
        if check is not None:
            self._box.verify_check(bytes(check[0]))

    async def check(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1 FROM meta LIMIT 1").fetchall())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(loop.run_in_executor(self._executor, conn.close),
                                       self._call_timeout)
            except (TimeoutError, sqlite3.Error):
                pass  # closing: nothing left to save
        self._executor.shutdown(wait=False)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    # -- enrollments ------------------------------------------------------------------------

    async def enroll(self, user: str, secret: str, created_at: float, *,
                     replace: bool = False) -> bool:
        blob = self._box.encrypt(user, secret)

        def run() -> bool:
            if replace:
                self._db.execute("INSERT OR REPLACE INTO enrollments VALUES (?, ?, ?)",
                                 (user, blob, created_at))
                return True
            cur = self._db.execute("INSERT OR IGNORE INTO enrollments VALUES (?, ?, ?)",
                                   (user, blob, created_at))
            return cur.rowcount == 1
        return await self._run(run)

    async def secret_for(self, user: str) -> str | None:
        row = await self._run(lambda: self._db.execute(
            "SELECT secret FROM enrollments WHERE user = ?", (user,)).fetchone())
        if row is None:
            return None
        try:
            return self._box.decrypt(user, bytes(row[0]))
        except SecretKeyError:
            raise
        except UnicodeDecodeError:
            raise SecretKeyError(f"the TOTP secret of {user} is not valid text") from None

    async def is_enrolled(self, user: str) -> bool:
        row = await self._run(lambda: self._db.execute(
            "SELECT 1 FROM enrollments WHERE user = ?", (user,)).fetchone())
        return row is not None

    async def revoke(self, user: str) -> bool:
        cur = await self._run(lambda: self._db.execute(
            "DELETE FROM enrollments WHERE user = ?", (user,)))
        return cur.rowcount > 0

    async def enrollments(self) -> list[Enrollment]:
        rows = await self._run(lambda: self._db.execute(
            "SELECT user, created_at FROM enrollments ORDER BY user").fetchall())
        return [Enrollment(u, float(c)) for u, c in rows]

    # -- used codes -------------------------------------------------------------------------

    async def last_counter(self, user: str) -> int | None:
        row = await self._run(lambda: self._db.execute(
            "SELECT counter FROM counters WHERE user = ?", (user,)).fetchone())
        return None if row is None else int(row[0])

    async def accept_counter(self, user: str, counter: int) -> bool:
        # One statement, so atomic across connections and processes: the row is written only
        # when absent or smaller; rowcount says whether this call won.
        cur = await self._run(lambda: self._db.execute(
            "INSERT INTO counters (user, counter) VALUES (?, ?) "
            "ON CONFLICT (user) DO UPDATE SET counter = excluded.counter "
            "WHERE counters.counter < excluded.counter", (user, counter)))
        return cur.rowcount == 1

    # -- failures and lockouts --------------------------------------------------------------

    async def record_failure(self, user: str, client_addr: str, at: float,
                             since: float) -> FailureCounts:
        def run() -> FailureCounts:
            db = self._db
            with _immediate(db):
                db.execute("DELETE FROM failures WHERE user = ? AND at <= ?", (user, since))
                db.execute("INSERT INTO failures VALUES (?, ?, ?)", (user, client_addr, at))
                addr_n, user_n = db.execute(
                    "SELECT coalesce(sum(client_addr = ?), 0), count(*) FROM failures "
                    "WHERE user = ? AND at > ?", (client_addr, user, since)).fetchone()
            return FailureCounts(address=int(addr_n), user=int(user_n))
        return await self._run(run)

    async def clear_failures(self, user: str, client_addr: str) -> None:
        await self._run(lambda: self._db.execute(
            "DELETE FROM failures WHERE user = ? AND client_addr = ?", (user, client_addr)))

    async def add_lockout(self, user: str, client_addr: str | None, until: float) -> None:
        await self._run(lambda: self._db.execute(
            "INSERT INTO lockouts VALUES (?, ?, ?) ON CONFLICT (user, client_addr) "
            "DO UPDATE SET until = max(until, excluded.until)",
            (user, client_addr or "", until)))

    async def locked_until(self, user: str, client_addr: str,
                           now: float | None = None) -> float | None:
        t = self._now(now)
        row = await self._run(lambda: self._db.execute(
            "SELECT max(until) FROM lockouts WHERE user = ? AND client_addr IN (?, '') "
            "AND until > ?", (user, client_addr, t)).fetchone())
        return None if row is None or row[0] is None else float(row[0])

    async def lockouts(self, now: float | None = None) -> list[Lockout]:
        t = self._now(now)
        rows = await self._run(lambda: self._db.execute(
            "SELECT user, client_addr, until FROM lockouts WHERE until > ? "
            "ORDER BY user, client_addr", (t,)).fetchall())
        return [Lockout(u, a or None, float(x)) for u, a, x in rows]

    async def unlock(self, user: str) -> int:
        def run() -> int:
            db = self._db
            with _immediate(db):
                n = db.execute("DELETE FROM lockouts WHERE user = ?", (user,)).rowcount
                db.execute("DELETE FROM failures WHERE user = ?", (user,))
            return int(n)
        return await self._run(run)

    # -- grants -----------------------------------------------------------------------------

    async def add_grants(self, session_ids: Iterable[str], user: str, client_addr: str | None,
                         grants: Mapping[str, float]) -> None:
        addr = client_addr or ""
        rows = [(sid, user, addr, str(cls), float(exp))
                for sid in session_ids for cls, exp in grants.items()]
        if client_addr:
            rows += [("", user, addr, str(cls), float(exp)) for cls, exp in grants.items()]
        if not rows:
            return

        def run() -> None:
            db = self._db
            with _immediate(db):
                db.executemany(
                    "INSERT INTO grants VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (session_id, user, client_addr, step_class) "
                    "DO UPDATE SET expires_at = max(expires_at, excluded.expires_at)", rows)
        await self._run(run)

    async def grants_for(self, session_id: str, *, user: str | None = None,
                         client_addr: str | None = None,
                         now: float | None = None) -> dict[str, float]:
        t = self._now(now)
        # `session_id <> ''`: an empty id must not match the (user, client) rows.
        own = "(session_id = ? AND session_id <> '')"
        if user is not None and client_addr:
            sql = (f"SELECT step_class, max(expires_at) FROM grants WHERE expires_at > ? AND "
                   f"({own} OR (session_id = '' AND user = ? AND client_addr = ?)) "
                   f"GROUP BY step_class")
            args: tuple[object, ...] = (t, session_id, user, client_addr)
        else:
            sql = (f"SELECT step_class, max(expires_at) FROM grants WHERE expires_at > ? AND "
                   f"{own} GROUP BY step_class")
            args = (t, session_id)
        rows = await self._run(lambda: self._db.execute(sql, args).fetchall())
        return {str(c): float(e) for c, e in rows}

    async def drop_session_grants(self, session_id: str) -> None:
        if session_id:
            await self._run(lambda: self._db.execute(
                "DELETE FROM grants WHERE session_id = ?", (session_id,)))

    async def grants(self, now: float | None = None) -> list[Grant]:
        t = self._now(now)
        rows = await self._run(lambda: self._db.execute(
            "SELECT user, session_id, client_addr, step_class, expires_at FROM grants "
            "WHERE expires_at > ? ORDER BY user, session_id, client_addr, step_class",
            (t,)).fetchall())
        return [Grant(user=u, step_class=c, expires_at=float(e), session_id=s or None,
                      client_addr=None if s else (a or None))
                for u, s, a, c, e in rows]

    async def revoke_grants(self, user: str, client_addr: str | None = None) -> int:
        if client_addr is None:
            cur = await self._run(lambda: self._db.execute(
                "DELETE FROM grants WHERE user = ?", (user,)))
        else:
            cur = await self._run(lambda: self._db.execute(
                "DELETE FROM grants WHERE user = ? AND client_addr = ?", (user, client_addr)))
        return int(cur.rowcount)

    # -- housekeeping -----------------------------------------------------------------------

    async def prune(self, now: float | None = None, failure_horizon: float = 86400.0) -> None:
        t = self._now(now)

        def run() -> None:
            db = self._db
            with _immediate(db):
                db.execute("DELETE FROM grants WHERE expires_at <= ?", (t,))
                db.execute("DELETE FROM lockouts WHERE until <= ?", (t,))
                db.execute("DELETE FROM failures WHERE at <= ?", (t - failure_horizon,))
        await self._run(run)


class _immediate:
    """`BEGIN IMMEDIATE … COMMIT` (ROLLBACK on error): takes the write lock up front so a
    read-then-write cannot interleave with another process's."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
