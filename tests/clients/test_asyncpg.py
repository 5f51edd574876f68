"""asyncpg scenarios of PROTOCOL.md §4, direct vs through pgguard.

asyncpg always names its statements, prepares with Parse/Describe/Flush (no Sync) and reads
cursors with Execute(n)/Flush: a proxy that waits for Sync hangs here. Every scenario runs under
`asyncio.wait_for`, so a hang is a failure with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from tests.clients.conftest import (
    REFUSED_SQL,
    Target,
    assert_same,
    count_rows,
    reset_table,
    sqlstate_of,
)

pytestmark = pytest.mark.timeout(120)
Scenario = Callable[..., Awaitable[Any]]


async def connect(t: Target, **kw: Any) -> asyncpg.Connection:
    kw.setdefault("ssl", False)
    return await asyncpg.connect(host=t.host, port=t.port, user="app",
                                 password=t.password(), database="app", timeout=10, **kw)


def state(exc: BaseException) -> str:
    return f"E:{getattr(exc, 'sqlstate', None)}"


def run(scenario: Scenario, t: Target, *args: Any, deadline: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(t, *args), deadline))


def both(direct: Target, guarded: Target, scenario: Scenario, *args: Any,
         deadline: float = 60) -> tuple[Any, Any]:
    d = run(scenario, direct, *args, deadline=deadline)
    g = run(scenario, guarded, *args, deadline=deadline)
    assert_same(d, g, guarded_is_proxy=guarded.proxy is not None)
    return d, g


async def sc_basic(t: Target) -> dict:
    c = await connect(t, server_settings={"application_name": "matrix-asyncpg"})
    try:
        row = await c.fetchrow("SELECT current_user AS u, current_setting('application_name') AS a")
        # No arguments: asyncpg sends a simple Query, so several statements are allowed.
        status = await c.execute("CREATE TEMP TABLE tt (i int); INSERT INTO tt VALUES (1), (2)")
        named = [await c.fetchval("SELECT $1::int + 1", i) for i in range(3)]
        stmt = await c.prepare("SELECT $1::text || $2::text AS s")
        explicit = [await stmt.fetchval("a", str(i)) for i in range(2)]
        names = await c.fetchval(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '__asyncpg_%'")
        try:  # asyncpg 0.32 itself trips over EmptyQueryResponse; the two sides must agree
            empty = await c.execute("")
        except Exception as exc:
            empty = type(exc).__name__
        return {"row": dict(row), "status": status, "empty": empty, "named": named,
                "explicit": explicit, "prepared_statements": names > 0}
    finally:
        await c.close()


def test_basic_simple_and_extended(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_basic)
    assert d["row"] == {"u": "app", "a": "matrix-asyncpg"} and d["status"] == "INSERT 0 2"
    assert d["named"] == [1, 2, 3] and d["explicit"] == ["a0", "a1"]


async def sc_tls(t: Target) -> dict:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = await connect(t, ssl=ctx)
    try:
        return {"ssl": c._transport.get_extra_info("ssl_object") is not None,
                "row": await c.fetchval("SELECT 40 + 2")}
    finally:
        await c.close()


def test_tls(guarded: Target, direct: Target) -> None:
    """asyncpg sends no channel binding: SCRAM over TLS to pgguard works."""
    assert run(sc_tls, guarded) == {"ssl": True, "row": 42}


async def sc_executemany(t: Target, middle: str | None) -> dict:
    reset_table(t.pg)
    out: dict[str, Any] = {}
    c = await connect(t)
    try:
        rows = [(1, "a"), (2, "b"), (3, "c")]
        try:
            if middle == "server_error":
                rows[1] = (1, "duplicate key")
            await c.executemany("INSERT INTO m VALUES ($1, $2)", rows)
        except asyncpg.PostgresError as exc:
            out["error"] = state(exc)
        if middle == "refused":
            try:
                await c.executemany(f"INSERT INTO m {REFUSED_SQL.replace('SELECT', 'SELECT 9, ')}"
                                    " WHERE $1::int > 0", [(1,), (2,)])
            except asyncpg.PostgresError as exc:
                out["refused"] = state(exc)
        out["after"] = await c.fetchval("SELECT count(*) FROM m")
    finally:
        await c.close()
    out["committed"] = count_rows(t.pg)
    return out


def test_executemany(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_executemany, None)
    assert d == {"after": 3, "committed": 3}


def test_executemany_server_error(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_executemany, "server_error")
    assert d == {"error": "E:23505", "after": 0, "committed": 0}


def test_executemany_refused(direct: Target, guarded: Target) -> None:
    _, g = both(direct, guarded, sc_executemany, "refused")
    assert g == {"refused": f"E:{sqlstate_of(guarded)}", "after": 3, "committed": 3}


async def sc_tx(t: Target) -> dict:
    reset_table(t.pg)
    out: dict[str, Any] = {}
    c = await connect(t)
    try:
        async with c.transaction():
            await c.execute("INSERT INTO m VALUES (1, 'kept')")
        try:
            async with c.transaction():
                await c.execute("INSERT INTO m VALUES (2, 'lost')")
                await c.execute(REFUSED_SQL)
        except asyncpg.PostgresError as exc:
            out["refused_in_tx"] = state(exc)
        try:
            async with c.transaction():
                await c.execute("INSERT INTO m VALUES (3, 'lost')")
                await c.execute("INSERT INTO m VALUES (1, 'dup')")
        except asyncpg.PostgresError as exc:
            out["dup"] = state(exc)
        # Manual BEGIN; refused statement; COMMIT answers ROLLBACK.
        await c.execute("BEGIN")
        await c.execute("INSERT INTO m VALUES (4, 'lost')")
        try:
            await c.fetchval(REFUSED_SQL)
        except asyncpg.PostgresError as exc:
            out["refused_manual"] = state(exc)
        out["commit"] = await c.execute("COMMIT")
        out["rows"] = [list(r) for r in await c.fetch("SELECT id, v FROM m ORDER BY id")]
    finally:
        await c.close()
    out["committed"] = count_rows(t.pg)
    return out


def test_transactions_and_refusal(direct: Target, guarded: Target) -> None:
    d, g = both(direct, guarded, sc_tx)
    assert d["commit"] == "ROLLBACK" and d["rows"] == [[1, "kept"]] and d["dup"] == "E:23505"
    assert g["refused_in_tx"] == g["refused_manual"] == f"E:{sqlstate_of(guarded)}"
    assert g["committed"] == 1


async def sc_cursor(t: Target) -> dict:
    c = await connect(t)
    try:
        async with c.transaction():
            got = [r[0] async for r in c.cursor(
                "SELECT g FROM generate_series(1, 55) g", prefetch=10)]
            cur = await c.cursor("SELECT g FROM generate_series(1, 20) g")
            first = await cur.fetch(4)
            await cur.forward(10)
            after = await cur.fetchrow()
        return {"n": len(got), "sum": sum(got), "first": [r[0] for r in first],
                "after": after[0]}
    finally:
        await c.close()


def test_cursor_prefetch(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_cursor)
    assert d == {"n": 55, "sum": 1540, "first": [1, 2, 3, 4], "after": 15}


async def sc_copy(t: Target) -> dict:
    reset_table(t.pg)
    out: dict[str, Any] = {}
    c = await connect(t)
    try:
        out["records"] = await c.copy_records_to_table(
            "m", records=[(i, f"r{i}") for i in range(1, 301)])
        chunks: list[bytes] = []

        async def sink(chunk: bytes) -> None:
            chunks.append(chunk)

        out["to"] = await c.copy_from_query("SELECT id, v FROM m ORDER BY id", output=sink)
        out["md5"] = hashlib.md5(b"".join(chunks)).hexdigest()

        async def bad_source():  # type: ignore[no-untyped-def]
            yield b"1000\tok\n"
            yield b"oops\tbad\n"
            yield b"1001\tok\n"

        try:
            await c.copy_to_table("m", source=bad_source())
        except asyncpg.PostgresError as exc:
            out["bad"] = state(exc)
        out["after"] = await c.fetchval("SELECT count(*) FROM m")
    finally:
        await c.close()
    return out


def test_copy(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_copy)
    assert d["records"] == "COPY 300" and d["to"] == "COPY 300"
    assert d["bad"] == "E:22P02" and d["after"] == 300


async def sc_cancel(t: Target) -> dict:
    c = await connect(t)
    try:
        start = time.monotonic()
        try:
            await c.execute("SELECT pg_sleep(20)", timeout=0.5)
            got = "no error"
        except TimeoutError:
            got = "timeout"
        fast = time.monotonic() - start < 8
        # The cancel really reached the server: the session answers at once afterwards.
        after = await c.fetchval("SELECT 1", timeout=8)
        running = t.pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query ="
                            " 'SELECT pg_sleep(20)' AND state = 'active'").strip()
        return {"got": got, "fast": fast, "after": after, "still_running": running}
    finally:
        await c.close()


def test_cancel_timeout(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_cancel)
    assert d == {"got": "timeout", "fast": True, "after": 1, "still_running": "0"}


async def sc_notify(t: Target, direct: Target) -> dict:
    got: list[list[str]] = []
    seen = asyncio.Event()

    def on_note(_conn: Any, _pid: int, channel: str, payload: str) -> None:
        got.append([channel, payload])
        if len(got) == 3:
            seen.set()

    c = await connect(t)
    other = await connect(direct)
    try:
        await c.add_listener("matrix_chan", on_note)
        await other.execute("NOTIFY matrix_chan, 'idle'")
        async with c.transaction():
            await c.execute("NOTIFY matrix_chan, 'own, in tx'")
            await other.execute("NOTIFY matrix_chan, 'other, while listener in tx'")
        await asyncio.wait_for(seen.wait(), 10)
        return {"notifications": sorted(got)}
    finally:
        await c.close()
        await other.close()


def test_listen_notify(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_notify, direct)
    assert len(d["notifications"]) == 3


async def sc_fatal(t: Target) -> dict:
    c = await connect(t, server_settings={"application_name": "matrix-fatal-asyncpg"})
    try:
        await c.fetchval("SELECT 1")
        killed = t.pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                           " WHERE application_name = 'matrix-fatal-asyncpg'").strip()
        await asyncio.sleep(0.3)
        try:
            await c.fetchval("SELECT 1")
            err: dict[str, Any] = {"error": None}
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError) as exc:
            err = {"error": type(exc).__name__, "sqlstate": getattr(exc, "sqlstate", None)}
        return {"killed": killed, **err, "closed": c.is_closed()}
    finally:
        c.terminate()


def test_upstream_fatal(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_fatal)
    assert d["killed"] == "1" and d["closed"] and d["error"] is not None


async def sc_large(t: Target) -> dict:
    c = await connect(t)
    try:
        n = total = 0
        async with c.transaction():
            async for r in c.cursor("SELECT g, 'row ' || g FROM generate_series(1, 1000000) g",
                                    prefetch=50000):
                n += 1
                total += r[0]
        everything = await c.fetch("SELECT g FROM generate_series(1, 1000000) g")
        blob = bytes(range(256)) * (50 * 1024 * 1024 // 256)
        got = await c.fetchrow("SELECT length(b), md5(b) FROM (SELECT $1::bytea AS b) s", blob)
        big = "x" * (20 * 1024 * 1024)
        length = await c.fetchval(f"SELECT length('{big}')")
        return {"cursor": [n, total], "fetch": len(everything),
                "bind": [got[0], got[1] == hashlib.md5(blob).hexdigest()], "query": length}
    finally:
        await c.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pg", ["pg18"], indirect=True)  # one server version bounds the runtime
def test_large(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_large, deadline=200)
    assert d == {"cursor": [1000000, 500000500000], "fetch": 1000000,
                 "bind": [50 * 1024 * 1024, True], "query": 20 * 1024 * 1024}
