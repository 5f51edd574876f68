"""Step-up through the extended protocol with real drivers: asyncpg (Parse/Describe/Flush, then
Bind/Execute/Sync), psycopg (plain, pipeline, cancel, timeout), pgjdbc as DBeaver drives it
(unnamed statements, Execute with maxrows, a suspended portal executed again). And a client that
disconnects while held. One server version: these are about pgguard's relay, not the server."""

from __future__ import annotations

import asyncio
import json
import select
import subprocess
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerr

from pgguard.localpg import LocalPostgres
from tests.clients.conftest import pgjdbc_jar  # noqa: F401  (fixture)
from tests.integration import stepup_env as su

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.parametrize("pg", ["pg18"], indirect=True)]

HERE = Path(__file__).resolve().parent


@pytest.fixture
def env(pg: LocalPostgres, proxy_factory):
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(hold_timeout="20s"))
    return proxy, su.Codes(su.enroll(proxy))


def connect(proxy, **kw) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10, **kw)


async def aconnect(proxy) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="app",
                                 password=proxy.pg.password, database="app", ssl=False,
                                 timeout=10)


def run(coro, deadline: float = 60):
    return asyncio.run(asyncio.wait_for(coro, deadline))


# -- asyncpg ----------------------------------------------------------------------------------

def test_asyncpg_held_then_released(env) -> None:
    proxy, codes = env

    async def scenario() -> None:
        conn = await aconnect(proxy)
        notices: list = []
        conn.add_log_listener(lambda c, msg: notices.append(msg))
        try:
            sid = await conn.fetchval("SHOW pgguard.session_id")
            assert await conn.fetchval("SELECT count(*) FROM su_users") == 3
            task = asyncio.create_task(
                conn.fetch("SELECT email FROM su_users WHERE id <= $1 ORDER BY id", 2))
            await asyncio.to_thread(su.wait_for_hold, proxy, sid)
            assert not task.done()
            status, body = await asyncio.to_thread(su.post_code, proxy, sid, codes.next())
            assert status == 200, body
            assert body["session"] == sid and body["sessions"] == [sid]
            assert body["released"] is True and list(body["grants"]) == ["pii"]
            rows = await asyncio.wait_for(task, 10)
            assert [r["email"] for r in rows] == ["u1@example.com", "u2@example.com"]
            [n] = notices
            assert n.sqlstate == "01000"
            assert n.message == ("pgguard: statement held: step-up required "
                                 "(pii: public.su_users.email)")
            assert n.detail == f"session {sid}, user app, waiting up to 20 s"
            assert n.hint == su.hint(proxy, sid)
            # Elevated for 30 minutes now: the next PII read runs at once.
            assert await conn.fetchval("SELECT email FROM su_users WHERE id = $1", 3) \
                == "u3@example.com"
            assert len(notices) == 1
        finally:
            await conn.close(timeout=5)

    run(scenario())


def test_asyncpg_timeout_cancels_the_hold_and_session_stays_usable(env) -> None:
    proxy, _ = env

    async def scenario() -> None:
        conn = await aconnect(proxy)
        try:
            sid = await conn.fetchval("SHOW pgguard.session_id")
            with pytest.raises(TimeoutError):
                await conn.fetch(su.PII_SQL, timeout=1.0)
            assert await conn.fetchval("SELECT 40 + 2") == 42
            assert await asyncio.to_thread(su.holds, proxy) == []
            ended = await asyncio.to_thread(
                su.wait_audit, proxy, lambda e: e["event"] == "hold.end" and e["session"] == sid)
            assert ended["outcome"] == "cancel"
        finally:
            await conn.close(timeout=5)

    run(scenario())


def test_disconnect_while_held_leaves_no_hold(env) -> None:
    proxy, _ = env

    async def scenario() -> None:
        conn = await aconnect(proxy)
        sid = await conn.fetchval("SHOW pgguard.session_id")
        task = asyncio.create_task(conn.fetch(su.PII_SQL))
        await asyncio.to_thread(su.wait_for_hold, proxy, sid)
        conn.terminate()
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
            await asyncio.wait_for(task, 10)

    run(scenario())
    su.wait_no_holds(proxy)
    ended = su.wait_audit(proxy, lambda e: e["event"] == "hold.end")
    assert ended["outcome"] == "disconnect"
    su.wait_audit(proxy, lambda e: e["event"] == "session.end" and e["session"] == ended["session"])
    # The proxy serves on, without having logged an error.
    with connect(proxy) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert su.log_errors(proxy) == []


# -- psycopg ----------------------------------------------------------------------------------

def test_psycopg_extended_held_then_released(env) -> None:
    proxy, codes = env
    with connect(proxy) as conn:
        notices: list = []
        # A Diagnostic is only readable inside the handler.
        conn.add_notice_handler(lambda d: notices.append(
            (d.sqlstate, d.message_primary, d.message_detail, d.message_hint)))
        sid = conn.execute("SHOW pgguard.session_id").fetchone()[0]
        held = su.Background(lambda: conn.execute(
            "SELECT id, email FROM su_users WHERE id >= %s ORDER BY id", [2],
            prepare=False).fetchall())
        su.wait_for_hold(proxy, sid)
        assert not held.done()
        status, body = su.post_code(proxy, sid, codes.next())
        assert status == 200 and body["released"] is True, body
        assert held.result(10) == [(2, "u2@example.com"), (3, "u3@example.com")]
        assert notices == [(
            "01000", "pgguard: statement held: step-up required (pii: public.su_users.email)",
            f"session {sid}, user app, waiting up to 20 s", su.hint(proxy, sid))]
        released = su.wait_audit(proxy, lambda e: e["event"] == "statement"
                                 and e.get("decision") == "released")
        success = su.wait_audit(proxy, lambda e: e["event"] == "stepup.success")
        assert released["stepup_event"] == success["id"] and released["rows"] == 2


def test_libpq_pipeline_with_a_held_statement_in_the_middle(env) -> None:
    """libpq pipeline mode (through psycopg.pq): three statements, Sync, Flush. The result of
    the first arrives while the second is held; the second and third after the release.
    (psycopg's own Pipeline cannot show this: fetching one result waits for all queued ones.)"""
    proxy, codes = env
    with connect(proxy) as conn:
        sid = conn.execute("SHOW pgguard.session_id").fetchone()[0]
        pq = conn.pgconn
        pq.enter_pipeline_mode()
        for sql in (b"SELECT 'before'", su.PII_SQL.encode(), b"SELECT 'after'"):
            pq.send_query_params(sql, None)
        pq.pipeline_sync()
        pq.send_flush_request()
        while pq.flush():
            time.sleep(0.01)
        su.wait_for_hold(proxy, sid)
        got: list = []

        def read_results(until: float, want: int) -> None:
            while len(got) < want and time.monotonic() < until:
                select.select([pq.socket], [], [], 0.1)
                pq.consume_input()
                while not pq.is_busy() and len(got) < want:
                    r = pq.get_result()
                    if r is None:
                        continue
                    got.append([[r.get_value(i, j).decode() for j in range(r.nfields)]
                                for i in range(r.ntuples)] if r.status == 2 else r.status)

        read_results(time.monotonic() + 3, 1)
        before_release = list(got)
        status, body = su.post_code(proxy, sid, codes.next())
        assert status == 200, body
        read_results(time.monotonic() + 10, 4)
        pq.exit_pipeline_mode()
        assert got == [[["before"]], [[e] for (e,) in su.EMAILS], [["after"]],
                       psycopg.pq.ExecStatus.PIPELINE_SYNC]
        assert before_release == [[["before"]]], "the earlier result waited for the release"


def test_psycopg_pipeline_synced_before_the_held_statement(env) -> None:
    """A pipeline with a Sync after the first statement: its result arrives while the next is
    held; the held one and the one behind it complete after the release, in order."""
    proxy, codes = env
    with connect(proxy) as conn:
        sid = conn.execute("SHOW pgguard.session_id").fetchone()[0]
        approver = su.Background(lambda: (su.wait_for_hold(proxy, sid), time.monotonic(),
                                          su.post_code(proxy, sid, codes.next())))
        with conn.pipeline() as p:
            c1 = conn.execute("SELECT 'before'")
            p.sync()
            assert c1.fetchone() == ("before",)
            assert not approver.done()
            c2 = conn.execute(su.PII_SQL)
            c3 = conn.execute("SELECT 'after', %s::int", [7])
            assert c2.fetchall() == su.EMAILS
            assert c3.fetchone() == ("after", 7)
        _, _, (status, body) = approver.result()
        assert status == 200 and body["released"], body


def test_psycopg_cancel_while_held(env) -> None:
    proxy, _ = env
    with connect(proxy) as conn:
        sid = conn.execute("SHOW pgguard.session_id").fetchone()[0]
        held = su.Background(lambda: conn.execute(su.PII_SQL).fetchall())
        su.wait_for_hold(proxy, sid)
        t0 = time.monotonic()
        conn.cancel_safe(timeout=5)
        with pytest.raises(pgerr.QueryCanceled) as exc:
            held.result(10)
        assert time.monotonic() - t0 < 3
        assert exc.value.sqlstate == "57014"
        assert exc.value.diag.message_primary == "canceling statement due to user request"
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
        assert su.holds(proxy) == []
    ended = su.wait_audit(proxy, lambda e: e["event"] == "hold.end")
    assert ended["outcome"] == "cancel" and ended["session"] == sid


def test_psycopg_hold_timeout(pg: LocalPostgres, proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(hold_timeout="3s"))
    su.enroll(proxy)
    with connect(proxy) as conn:
        sid = conn.execute("SHOW pgguard.session_id").fetchone()[0]
        t0 = time.monotonic()
        with pytest.raises(pgerr.InsufficientPrivilege) as exc:
            conn.execute("SELECT email FROM su_users WHERE id = %s", [1])
        assert 2.9 <= time.monotonic() - t0 < 8
        diag = exc.value.diag
        assert (diag.sqlstate, diag.message_primary, diag.message_hint) == (
            "42501", "pgguard: step-up required; hold timed out after 3 s", su.hint(proxy, sid))
        assert conn.execute("SELECT count(*) FROM su_users").fetchone() == (3,)
    assert su.holds(proxy) == []
    ended = su.wait_audit(proxy, lambda e: e["event"] == "hold.end")
    assert ended["outcome"] == "timeout"
    su.wait_audit(proxy, lambda e: e["event"] == "statement" and e.get("decision") == "timed_out")


def test_psycopg_timeout_inside_transaction_rolls_back(pg: LocalPostgres,
                                                       proxy_factory) -> None:
    """Extended protocol: BEGIN; INSERT; <held, timed out>; COMMIT commits nothing, and
    `SHOW pgguard.status` in the failed transaction gets the server's 25P02."""
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(hold_timeout="3s"))
    su.enroll(proxy)
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:  # not autocommit
        conn.execute("INSERT INTO su_orders VALUES (%s)", [1])
        with pytest.raises(pgerr.InsufficientPrivilege):
            conn.execute("SELECT email FROM su_users WHERE id = %s", [1])
        with pytest.raises(pgerr.InFailedSqlTransaction):
            conn.execute("SHOW pgguard.status")
        conn.commit()  # the server answers ROLLBACK
        assert conn.execute("SELECT count(*) FROM su_orders").fetchone() == (0,)
    assert su.orders_count(pg) == 0


# -- pgjdbc -----------------------------------------------------------------------------------

def test_pgjdbc_dbeaver_like_maxrows_and_fetchsize(pg: LocalPostgres, proxy_factory,
                                                   pgjdbc_jar: Path) -> None:  # noqa: F811
    """Each PII select needs a fresh code (pii: 0s): the first is an unnamed statement with
    Execute maxrows=200 in autocommit, the second a cursor-like fetch (Execute maxrows=50,
    PortalSuspended, Execute again) in a transaction; both held at their first Execute."""
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(step_up={"pii": "0s"}))
    codes = su.Codes(su.enroll(proxy))
    proc = subprocess.Popen(
        ["java", "-cp", str(pgjdbc_jar), str(HERE / "java" / "StepUpClient.java"),
         f"jdbc:postgresql://127.0.0.1:{proxy.port}/app", pg.password],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        steps: dict[str, dict] = {}

        def step() -> dict:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, f"StepUpClient ended: {proc.stderr.read()}"  # type: ignore[union-attr]
            obj = json.loads(line)
            steps[obj["step"]] = obj
            return obj

        sid = step()["session"]
        for name in ("maxrows", "fetchsize"):
            su.wait_for_hold(proxy, sid, timeout=30)
            status, body = su.post_code(proxy, sid, codes.next())
            assert status == 200 and body["released"] and body["grants"] == {}, body
            assert step()["step"] == name
        assert step() == {"step": "done", "after": 1}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    warning = ("01000 pgguard: statement held: step-up required (pii: public.su_big.email)")
    assert steps["maxrows"] == {"step": "maxrows", "rows": 200, "first": 1, "last": 200,
                                "last_email": "b200@example.com", "warning": warning}
    assert steps["fetchsize"] == {"step": "fetchsize", "rows": 250, "first": 1, "last": 250,
                                  "last_email": "b250@example.com", "warning": warning}
    ends = su.wait_audit_count(proxy, "hold.end", 2)
    assert [e["outcome"] for e in ends] == ["released"] * 2
