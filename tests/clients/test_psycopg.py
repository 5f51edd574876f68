"""psycopg 3 (bundled libpq 18) scenarios of PROTOCOL.md §4, direct vs through pgguard."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgguard.localpg import LocalPostgres
from tests.clients.conftest import (
    REFUSED_SQL,
    Target,
    assert_same,
    count_rows,
    reset_table,
    sqlstate_of,
)

pytestmark = pytest.mark.timeout(120)


def connect(t: Target, **extra: str) -> psycopg.Connection:
    return psycopg.connect(t.dsn(**extra), autocommit=True)


def state(exc: BaseException) -> str:
    return f"E:{getattr(exc, 'sqlstate', None)}"


def both(direct: Target, guarded: Target, scenario: Any, *args: Any) -> tuple[Any, Any]:
    d = scenario(direct, *args)
    g = scenario(guarded, *args)
    assert_same(d, g, guarded_is_proxy=guarded.proxy is not None)
    return d, g


# -- 1 SCRAM over plaintext; startup settings ---------------------------------------------------

def sc_scram(t: Target) -> dict:
    with connect(t, application_name="matrix-psycopg") as c:
        row = c.execute("SELECT current_user, current_setting('application_name'),"
                        " current_setting('search_path')").fetchone()
        return {"row": list(row), "ssl": c.pgconn.ssl_in_use,
                "pid_positive": c.info.backend_pid > 0}


def test_scram_plaintext(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_scram)
    assert d["row"] == ["app", "matrix-psycopg", '"$user", public']


def sc_options(t: Target) -> dict:
    with connect(t, options="-c search_path=pg_catalog,public") as c:
        return {"search_path": c.execute("SHOW search_path").fetchone()[0]}


def test_harmless_options_allowed(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_options)
    assert d == {"search_path": "pg_catalog,public"}


def test_startup_refusals(guarded: Target) -> None:
    with pytest.raises(psycopg.OperationalError) as ei:
        connect(guarded, replication="database")
    assert "pgguard: replication connections are not allowed" in str(ei.value)
    with pytest.raises(psycopg.OperationalError) as ei:
        connect(guarded, options="-c role=postgres")
    assert "pgguard: startup setting role is not allowed" in str(ei.value)


# -- 2/3 TLS toward pgguard --------------------------------------------------------------------

def tls_attempt(t: Target, **extra: str) -> dict:
    start = time.monotonic()
    try:
        with connect(t, sslmode="require", **extra) as c:
            got = {"ok": c.execute("SELECT 41 + 1").fetchone()[0], "ssl": c.pgconn.ssl_in_use,
                   "alpn": (c.pgconn.ssl_attribute(b"alpn") or b"").decode()
                   if hasattr(c.pgconn, "ssl_attribute") else None}
    except psycopg.OperationalError as exc:
        got = {"error": str(exc)}
    got["seconds"] = time.monotonic() - start
    return got


def test_tls_sslrequest_channel_binding(guarded: Target) -> None:
    for cb in ("prefer", "disable"):
        got = tls_attempt(guarded, channel_binding=cb)
        assert got.get("ok") == 42 and got["ssl"], (cb, got, guarded.log()[-2000:])
    # pgguard never relays SCRAM-SHA-256-PLUS: libpq must refuse cleanly and quickly.
    got = tls_attempt(guarded, channel_binding="require")
    assert "error" in got and got["seconds"] < 8, got
    assert "channel binding" in got["error"], got


def test_direct_tls_alpn(guarded: Target) -> None:
    got = tls_attempt(guarded, sslnegotiation="direct")
    assert got.get("ok") == 42 and got["ssl"], (got, guarded.log()[-2000:])


def test_tls_cancel(direct: Target, guarded: Target, pg: LocalPostgres) -> None:
    """cancel_safe() over TLS: libpq 18 sends SSLRequest, TLS, then CancelRequest."""
    expected = {"sqlstate": "E:57014", "fast": True, "after": 1}
    if pg.ssl:
        assert sc_cancel(direct, sslmode="require") == expected
    assert sc_cancel(guarded, sslmode="require") == expected


# -- 4 protocol 3.2 ----------------------------------------------------------------------------

def sc_proto32(t: Target) -> dict:
    with connect(t, max_protocol_version="3.2") as c:
        out = {"version": c.pgconn.full_protocol_version,
               "row": c.execute("SELECT 1").fetchone()[0]}
    out["cancel"] = sc_cancel(t, max_protocol_version="3.2")
    return out


def test_protocol_32(direct: Target, guarded: Target, pg: LocalPostgres) -> None:
    d, _ = both(direct, guarded, sc_proto32)
    assert d["version"] == (30002 if pg.version >= 18 else 30000)
    assert d["cancel"]["sqlstate"] == "E:57014"


# -- 5 multi-statement simple Query; empty query -----------------------------------------------

def sc_multi(t: Target) -> dict:
    with connect(t) as c:
        cur = psycopg.ClientCursor(c)
        cur.execute("SELECT 1 AS a; SELECT 'x' AS b, 2 AS c; CREATE TEMP TABLE tt(i int)")
        sets = []
        while True:
            sets.append({"status": cur.statusmessage,
                         "rows": [list(r) for r in cur.fetchall()] if cur.description else None})
            if not cur.nextset():
                break
        try:
            c.execute("")
            empty = "ok"
        except psycopg.Error as exc:
            empty = type(exc).__name__
        c.execute("-- only a comment")
        return {"sets": sets, "empty": empty, "after": c.execute("SELECT 7").fetchone()[0]}


def test_multi_statement_and_empty(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_multi)
    assert d["sets"][1]["rows"] == [["x", 2]] and d["after"] == 7


# -- 6 extended: unnamed then named ------------------------------------------------------------

def sc_extended(t: Target) -> dict:
    with connect(t) as c:
        rows = [c.execute("SELECT %s::int * 2", [i]).fetchone()[0] for i in range(7)]
        explicit = c.execute("SELECT %s::text || 'y'", ["x"], prepare=True).fetchone()[0]
        names = [r[0] for r in c.execute(
            "SELECT name FROM pg_prepared_statements ORDER BY name", prepare=False)]
        c.execute("DEALLOCATE ALL")
        again = c.execute("SELECT %s::int * 2", [21]).fetchone()[0]
        return {"rows": rows, "explicit": explicit, "names": names, "again": again}


def test_extended_unnamed_then_named(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_extended)
    assert d["rows"] == [0, 2, 4, 6, 8, 10, 12] and len(d["names"]) == 2 and d["again"] == 42


# -- 7/8/9 pipeline, server error and policy refusal inside it ---------------------------------

def sc_pipeline(t: Target, middle: str | None) -> dict:
    reset_table(t.pg)
    out: dict[str, Any] = {}
    with connect(t) as c:
        try:
            with c.pipeline() as p:
                c.execute("INSERT INTO m VALUES (1, 'a')")
                if middle:
                    c.execute(middle)
                c.execute("INSERT INTO m VALUES (2, 'b')")
                cur = c.execute("SELECT count(*) FROM m")
                p.sync()
                out["count_in_pipeline"] = cur.fetchone()[0]
        except psycopg.Error as exc:
            out["error"] = state(exc)
        out["after"] = c.execute("SELECT count(*) FROM m").fetchone()[0]
    out["committed"] = count_rows(t.pg)
    return out


def test_pipeline(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_pipeline, None)
    assert d == {"count_in_pipeline": 2, "after": 2, "committed": 2}


def test_pipeline_server_error(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_pipeline, "SELECT 1/0")
    assert d == {"error": "E:22012", "after": 0, "committed": 0}


def test_pipeline_policy_refusal(direct: Target, guarded: Target) -> None:
    _, g = both(direct, guarded, sc_pipeline, REFUSED_SQL)
    assert g == {"error": f"E:{sqlstate_of(guarded)}", "after": 0, "committed": 0}


def sc_refused_in_tx(t: Target) -> dict:
    reset_table(t.pg)
    out: dict[str, Any] = {}
    with connect(t) as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO m VALUES (1, 'a')")
        try:
            c.execute(REFUSED_SQL)
        except psycopg.Error as exc:
            out["error"] = state(exc)
        try:
            c.execute("SELECT 1")
        except psycopg.Error as exc:
            out["in_failed_tx"] = state(exc)
        out["commit"] = c.execute("COMMIT").statusmessage
        out["usable"] = c.execute("SELECT 5").fetchone()[0]
        # The simple-protocol form: a multi-statement Query is refused whole.
        try:
            psycopg.ClientCursor(c).execute(f"INSERT INTO m VALUES (3, 'c'); {REFUSED_SQL}")
        except psycopg.Error as exc:
            out["multi_error"] = state(exc)
    out["committed"] = count_rows(t.pg)
    return out


def test_policy_refusal_in_transaction(direct: Target, guarded: Target) -> None:
    d, g = both(direct, guarded, sc_refused_in_tx)
    assert d["commit"] == "ROLLBACK" and d["in_failed_tx"] == "E:25P02"
    assert g["error"] == g["multi_error"] == f"E:{sqlstate_of(guarded)}"
    assert g["committed"] == 0 and g["usable"] == 5


def test_policy_refusal_message(guarded: Target) -> None:
    with connect(guarded) as c, pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
        c.execute(REFUSED_SQL)
    assert ei.value.diag.message_primary == "pgguard: statement rejected by policy"
    assert ei.value.diag.severity == "ERROR"


# -- 10 cursors / portal suspend ---------------------------------------------------------------

def sc_cursor(t: Target) -> dict:
    with psycopg.connect(t.dsn()) as c:  # named cursors need a transaction
        cur = c.cursor(name="matrix_cur")
        cur.itersize = 7
        cur.execute("SELECT g, repeat('x', g % 5) FROM generate_series(1, 40) g")
        first = cur.fetchmany(3)
        rest = list(cur)
        cur.close()
        scroll = c.cursor(name="matrix_scroll", scrollable=True)
        scroll.execute("SELECT g FROM generate_series(1, 10) g")
        scroll.scroll(5)
        tail = scroll.fetchall()
        c.commit()
        return {"first": [list(r) for r in first], "rest": len(rest),
                "last": list(rest[-1]), "tail": [r[0] for r in tail]}


def test_named_cursor(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_cursor)
    assert d["rest"] == 37 and d["tail"] == [6, 7, 8, 9, 10]


# -- 11 COPY ----------------------------------------------------------------------------------

def sc_copy(t: Target) -> dict:
    reset_table(t.pg)
    out: dict[str, Any] = {}
    with connect(t) as c:
        with c.cursor().copy("COPY m (id, v) FROM STDIN") as cp:
            for i in range(1, 501):
                cp.write_row((i, f"row{i}"))
        out["in_rows"] = c.execute("SELECT count(*) FROM m").fetchone()[0]
        buf = bytearray()
        with c.cursor().copy("COPY (SELECT id, v FROM m ORDER BY id) TO STDOUT") as cp:
            for chunk in cp:
                buf += chunk
        out["out_md5"] = hashlib.md5(buf).hexdigest()
        out["out_lines"] = buf.count(b"\n")
        try:
            with c.cursor().copy("COPY m (id, v) FROM STDIN") as cp:
                cp.write(b"1000\tok\n")
                cp.write(b"notanint\tbad\n")
                cp.write(b"1001\tok\n")
        except psycopg.Error as exc:
            out["bad_copy"] = state(exc)
        try:
            with c.cursor().copy("COPY m (id, v) FROM STDIN") as cp:
                cp.write(b"2000\tok\n")
                raise RuntimeError("client aborts the copy")
        except psycopg.Error as exc:
            out["client_abort"] = state(exc)
        except RuntimeError:
            out["client_abort"] = "RuntimeError"
        out["after"] = c.execute("SELECT count(*) FROM m").fetchone()[0]
    return out


def test_copy(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_copy)
    assert d["in_rows"] == 500 and d["out_lines"] == 500
    assert d["bad_copy"] == "E:22P02" and d["after"] == 500


# -- 12 cancel ---------------------------------------------------------------------------------

def sc_cancel(t: Target, **extra: str) -> dict:
    with connect(t, **extra) as c:
        timer = threading.Timer(0.5, c.cancel_safe, kwargs={"timeout": 10})
        start = time.monotonic()
        timer.start()
        try:
            c.execute("SELECT pg_sleep(20)")
            got = "no error"
        except psycopg.Error as exc:
            got = state(exc)
        finally:
            timer.cancel()
        fast = time.monotonic() - start < 10
        after = c.execute("SELECT 1").fetchone()[0]
    return {"sqlstate": got, "fast": fast, "after": after}


def test_cancel(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_cancel)
    assert d == {"sqlstate": "E:57014", "fast": True, "after": 1}


# -- 13 transactions ---------------------------------------------------------------------------

def sc_tx(t: Target) -> dict:
    reset_table(t.pg)
    out: dict[str, Any] = {}
    with psycopg.connect(t.dsn()) as c:
        c.execute("INSERT INTO m VALUES (1, 'kept')")
        c.commit()
        c.execute("INSERT INTO m VALUES (2, 'rolled back')")
        c.rollback()
        with c.transaction():
            c.execute("INSERT INTO m VALUES (3, 'tx block')")
        c.commit()
        c.autocommit = True
        c.execute("BEGIN")
        c.execute("INSERT INTO m VALUES (4, 'lost')")
        try:
            c.execute("INSERT INTO m VALUES (1, 'dup')")
        except psycopg.Error as exc:
            out["dup"] = state(exc)
        out["status_in_error"] = c.info.transaction_status.name
        out["commit"] = c.execute("COMMIT").statusmessage
        out["status_after"] = c.info.transaction_status.name
        out["rows"] = [list(r) for r in c.execute("SELECT id, v FROM m ORDER BY id")]
    return out


def test_transactions(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_tx)
    assert d == {"dup": "E:23505", "status_in_error": "INERROR", "commit": "ROLLBACK",
                 "status_after": "IDLE", "rows": [[1, "kept"], [3, "tx block"]]}


# -- 15 LISTEN/NOTIFY --------------------------------------------------------------------------

def sc_notify(t: Target, direct: Target) -> dict:
    got: list[list[str]] = []
    with connect(t) as c, connect(direct) as other:
        c.execute("LISTEN matrix_chan")
        other.execute("NOTIFY matrix_chan, 'idle'")
        for n in c.notifies(timeout=5, stop_after=1):
            got.append([n.channel, n.payload])
        c.execute("BEGIN")
        c.execute("NOTIFY matrix_chan, 'own, in tx'")
        other.execute("NOTIFY matrix_chan, 'other, while listener in tx'")
        c.execute("COMMIT")
        for n in c.notifies(timeout=5, stop_after=2):
            got.append([n.channel, n.payload])
    return {"notifications": sorted(got)}


def test_listen_notify(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_notify, direct)
    assert len(d["notifications"]) == 3


# -- 17 upstream FATAL mid-session -------------------------------------------------------------

def sc_fatal(t: Target) -> dict:
    with connect(t, application_name="matrix-fatal-psycopg") as c:
        c.execute("SELECT 1")
        killed = t.pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                           " WHERE application_name = 'matrix-fatal-psycopg'").strip()
        time.sleep(0.3)
        try:
            c.execute("SELECT 1")
            err = {"error": None}
        except psycopg.Error as exc:
            msg = str(exc)
            err = {"error": type(exc).__name__, "sqlstate": getattr(exc, "sqlstate", None),
                   "terminating": msg.count("terminating connection"), "message": msg}
        return {"killed": killed, **err, "closed": c.closed}


def test_upstream_fatal(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_fatal)
    assert d["killed"] == "1" and d["closed"] and d["sqlstate"] == "57P01"
    assert d["terminating"] == 1, d["message"]


# -- 14 large ----------------------------------------------------------------------------------

def sc_large(t: Target) -> dict:
    out: dict[str, Any] = {}
    with connect(t) as c:
        cur = c.execute("SELECT g, 'row ' || g FROM generate_series(1, 1000000) g")
        n = total = 0
        for row in cur:
            n += 1
            total += row[0]
        out["rows"] = [n, total]
        blob = bytes(range(256)) * (50 * 1024 * 1024 // 256)
        got = c.execute("SELECT length(b), md5(b) FROM (SELECT %b::bytea AS b) s",
                        [blob]).fetchone()
        out["bind"] = [got[0], got[1] == hashlib.md5(blob).hexdigest()]
        big = "x" * (20 * 1024 * 1024)
        got = psycopg.ClientCursor(c).execute(
            sql.SQL("SELECT length({})").format(sql.Literal(big))).fetchone()
        out["query"] = got[0]
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pg", ["pg18"], indirect=True)  # one server version bounds the runtime
def test_large(direct: Target, guarded: Target) -> None:
    d, _ = both(direct, guarded, sc_large)
    assert d == {"rows": [1000000, 500000500000], "bind": [50 * 1024 * 1024, True],
                 "query": 20 * 1024 * 1024}
