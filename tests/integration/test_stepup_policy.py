"""What the policy makes of step-up, end to end (DESIGN §5, §6): grant lifetimes (a short ttl
expiring, `0s` demanding a fresh code each time), `stepup.scope` client vs session with a
DBeaver-like client holding two connections, a user without an authenticator, a state store
that cannot be opened (fail closed), and policy reloads (a broken file keeps the old policy)."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request

import psycopg
import pytest
from psycopg import errors as pgerr

from pgguard.localpg import LocalPostgres
from tests.integration import stepup_env as su

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.parametrize("pg", ["pg18"], indirect=True)]


def connect(proxy, app_name: str = "pgguard-test") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10,
                           application_name=app_name)


def session_id(conn: psycopg.Connection) -> str:
    return str(conn.execute("SHOW pgguard.session_id").fetchone()[0])


def quick_pii(conn: psycopg.Connection) -> list:
    """A PII select that must run at once (the session holds a grant)."""
    t0 = time.monotonic()
    rows = conn.execute(su.PII_SQL).fetchall()
    assert time.monotonic() - t0 < 1.5
    return rows


def held_then_released(proxy, conn: psycopg.Connection, sid: str, code: str) -> dict:
    held = su.Background(lambda: conn.execute(su.PII_SQL).fetchall())
    su.wait_for_hold(proxy, sid)
    status, body = su.post_code(proxy, sid, code)
    assert status == 200 and body["released"] is True, body
    assert held.result(10) == su.EMAILS
    return dict(body)


def test_short_grant_expires(pg: LocalPostgres, proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(step_up={"pii": "3s"}))
    codes = su.Codes(su.enroll(proxy))
    with connect(proxy) as conn:
        sid = session_id(conn)
        body = held_then_released(proxy, conn, sid, codes.next())
        granted = time.time()
        assert list(body["grants"]) == ["pii"]
        assert quick_pii(conn) == su.EMAILS
        assert "elevated: pii until " in conn.execute("SHOW pgguard.status").fetchone()[0]
        time.sleep(max(0.0, granted + 3.3 - time.time()))
        assert conn.execute("SHOW pgguard.status").fetchone()[0].endswith("elevated: none")
        held_then_released(proxy, conn, sid, codes.next())  # held again, new code
    ends = su.wait_audit_count(proxy, "hold.end", 2)
    assert [e["outcome"] for e in ends] == ["released"] * 2


def test_named_statement_prepared_while_elevated_is_held_after_expiry(
        pg: LocalPostgres, proxy_factory) -> None:
    """DESIGN §3: a named statement prepared while elevated and executed after the grant
    expired is decided again at its next first Execute (the verdict is not cached with it)."""
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(step_up={"pii": "3s"}))
    codes = su.Codes(su.enroll(proxy))
    with connect(proxy) as conn:
        sid = session_id(conn)
        held_then_released(proxy, conn, sid, codes.next())
        granted = time.time()
        # prepared (a named server-side statement) and executed while elevated: no hold
        for _ in range(3):
            t0 = time.monotonic()
            assert conn.execute(su.PII_SQL, prepare=True).fetchall() == su.EMAILS
            assert time.monotonic() - t0 < 1.5
        time.sleep(max(0.0, granted + 3.3 - time.time()))
        # the same prepared statement, after expiry: held again until a new code
        held = su.Background(lambda: conn.execute(su.PII_SQL, prepare=True).fetchall())
        su.wait_for_hold(proxy, sid)
        status, body = su.post_code(proxy, sid, codes.next())
        assert status == 200 and body["released"] is True, body
        assert held.result(10) == su.EMAILS
    su.wait_audit_count(proxy, "hold.end", 2)  # written in batches: after both held statements
    assert [e["decision"] for e in su.audit_events(proxy, "statement")
            if e["decision"] != "allowed"].count("held") == 2


def test_zero_ttl_needs_a_fresh_code_each_time(pg: LocalPostgres, proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(step_up={"pii": "0s"}))
    codes = su.Codes(su.enroll(proxy))
    with connect(proxy) as conn:
        sid = session_id(conn)
        assert held_then_released(proxy, conn, sid, codes.next())["grants"] == {}
        # The next PII select is held again; the CLI says nothing lasting was granted.
        held = su.Background(lambda: conn.execute(su.PII_SQL).fetchall())
        su.wait_for_hold(proxy, sid)
        cli = su.stepup_cli(proxy, sid, "--code", codes.next())
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout == ("granted for app: this statement only (fresh code required each "
                              "time)\nthe held statement is running\n")
        assert held.result(10) == su.EMAILS
        assert conn.execute("SHOW pgguard.status").fetchone()[0].endswith("elevated: none")


def test_client_scope_two_connections_ttl_zero(pg: LocalPostgres, proxy_factory) -> None:
    """A role whose step_up classes all have ttl 0, and DBeaver's two connections from one
    address: one step-up releases the held statement on both; nothing lasting is granted."""
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(step_up={"pii": "0s", "write": "0s"}, scope="client"))
    codes = su.Codes(su.enroll(proxy))
    with connect(proxy, "DBeaver - Main") as main, connect(proxy, "DBeaver - Metadata") as meta:
        a, b = session_id(main), session_id(meta)
        held_a = su.Background(lambda: main.execute(su.PII_SQL).fetchall())
        held_b = su.Background(lambda: meta.execute("INSERT INTO su_orders VALUES (1)").rowcount)
        pending = su.wait_for_hold(proxy, count=2)
        assert {h["session"]: h["classes"] for h in pending} == {a: ["pii"], b: ["write"]}
        status, body = su.post_code(proxy, a, codes.next())
        assert status == 200, body
        assert body["grants"] == {} and body["released"] is True
        assert sorted(body["sessions"]) == sorted([a, b]) and body["sessions"][0] == a
        assert held_a.result(10) == su.EMAILS
        assert held_b.result(10) == 1
        assert su.holds(proxy) == []
        # ttl 0: the next one is held again.
        again = su.Background(lambda: meta.execute(su.PII_SQL).fetchall())
        su.wait_for_hold(proxy, b)
        meta.cancel_safe(timeout=5)
        with pytest.raises(pgerr.QueryCanceled):
            again.result(10)
    assert su.orders_count(pg) == 1
    su.wait_audit(proxy, lambda e: e["event"] == "hold.end" and e["outcome"] == "cancel")
    ends = su.wait_audit_count(proxy, "hold.end", 3)
    outcomes = sorted((e["session"], e["outcome"]) for e in ends)
    assert outcomes == sorted([(a, "released"), (b, "released"), (b, "cancel")])


def test_client_scope_grant_covers_the_other_and_new_connections(pg: LocalPostgres,
                                                                 proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(step_up={"pii": "30m"}, scope="client"))
    codes = su.Codes(su.enroll(proxy))
    with connect(proxy, "DBeaver - Main") as main, connect(proxy, "DBeaver - Metadata") as meta:
        a, b = session_id(main), session_id(meta)
        body = held_then_released(proxy, main, a, codes.next())
        assert sorted(body["sessions"]) == sorted([a, b])
        assert quick_pii(meta) == su.EMAILS
        with connect(proxy, "DBeaver - SQL editor 2") as third:
            assert quick_pii(third) == su.EMAILS
    su.wait_audit_count(proxy, "session.end", 3)
    assert len(su.audit_events(proxy, "hold.start")) == 1


def test_session_scope_releases_only_that_session(pg: LocalPostgres, proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(step_up={"pii": "30m"}, scope="session"))
    codes = su.Codes(su.enroll(proxy))
    with connect(proxy, "DBeaver - Main") as main, connect(proxy, "DBeaver - Metadata") as meta:
        a, b = session_id(main), session_id(meta)
        held_a = su.Background(lambda: main.execute(su.PII_SQL).fetchall())
        held_b = su.Background(lambda: meta.execute(su.PII_SQL).fetchall())
        su.wait_for_hold(proxy, count=2)
        status, body = su.post_code(proxy, a, codes.next())
        assert status == 200 and body["sessions"] == [a] and body["released"], body
        assert held_a.result(10) == su.EMAILS
        time.sleep(0.3)
        assert [h["session"] for h in su.holds(proxy)] == [b] and not held_b.done()
        meta.cancel_safe(timeout=5)
        with pytest.raises(pgerr.QueryCanceled):
            held_b.result(10)
        assert quick_pii(main) == su.EMAILS


def test_user_without_authenticator_is_refused_at_once(pg: LocalPostgres,
                                                       proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config())  # nobody enrolled
    with connect(proxy) as conn:
        t0 = time.monotonic()
        with pytest.raises(pgerr.InsufficientPrivilege) as exc:
            conn.execute(su.PII_SQL)
        assert time.monotonic() - t0 < 2
        diag = exc.value.diag
        assert (diag.sqlstate, diag.message_primary, diag.message_hint) == (
            "42501", "pgguard: step-up required but app has no authenticator",
            "an administrator can run: pgguard enroll app")
        assert conn.execute("SELECT count(*) FROM su_users").fetchone() == (3,)
        # A code for that session cannot help either.
        status, body = su.post_code(proxy, session_id(conn), "123456")
        assert status == 401 and "no authenticator" in body["error"], body
    su.wait_audit(proxy, lambda e: e["event"] == "stepup.failure"
                  and e["reason"] == "not_enrolled")
    denied = su.wait_audit(proxy, lambda e: e["event"] == "statement"
                           and e["decision"] == "denied")
    assert denied["pii_columns"] == ["public.su_users.email"]
    assert su.holds(proxy) == [] and su.audit_events(proxy, "hold.start") == []


def test_unreachable_state_store_refuses_sensitive_statements(pg: LocalPostgres,
                                                              proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(state="/proc/forbidden/x.db"))
    with connect(proxy) as conn:
        with pytest.raises(psycopg.Error) as exc:
            conn.execute(su.PII_SQL)
        assert exc.value.sqlstate == "58000"
        assert exc.value.diag.message_primary == ("pgguard: cannot verify step-up state; "
                                                  "sensitive statement refused")
        # A plain read the policy allows without step-up still works.
        assert conn.execute("SELECT count(*) FROM su_users").fetchone() == (3,)
        sid = session_id(conn)
    assert su.holds(proxy) == []
    status, body = su.post_code(proxy, sid, "123456")
    assert status != 200, body
    status, body = su.http("GET", f"{proxy.admin_url}/readyz")
    assert status == 503 and "state store" in json.dumps(body), body


# -- policy reload ------------------------------------------------------------------------------

def rewrite(proxy, text: str) -> None:
    proxy.config_path.write_text(text)
    proxy.signal(signal.SIGHUP)


def wait_log(proxy, event: str, contains: str = "", timeout: float = 10) -> dict:
    """The last JSON log line of `event` whose text contains `contains`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(line) for line in proxy.log().splitlines()
                 if line.startswith("{") and f'"event": "{event}"' in line and contains in line]
        if found:
            return dict(found[-1])
        assert time.monotonic() < deadline, f"no {event} log line:\n{proxy.log()}"
        time.sleep(0.1)


def test_policy_reload_bad_file_keeps_old_policy_good_file_applies(pg: LocalPostgres,
                                                                   proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config())
    good = json.loads(proxy.config_path.read_text())
    with connect(proxy) as conn:
        assert conn.execute("INSERT INTO su_orders VALUES (1)").rowcount == 1

        # Not YAML at all.
        rewrite(proxy, json.dumps(good, indent=1) + "\nroles: [oops\n")
        line = wait_log(proxy, "policy.reload_failed")
        assert line["level"] == "error"
        assert re.fullmatch(rf"{re.escape(str(proxy.config_path))}:\d+: not valid YAML: .*",
                            line["error"]), line
        assert conn.execute("INSERT INTO su_orders VALUES (2)").rowcount == 1

        # Valid YAML, unknown key: named with its path.
        bad = json.loads(json.dumps(good))
        bad["roles"]["oncall"]["alow"] = ["read"]
        rewrite(proxy, json.dumps(bad, indent=1))
        line = wait_log(proxy, "policy.reload_failed", "alow")
        assert re.fullmatch(rf"{re.escape(str(proxy.config_path))}:\d+: roles\.oncall\.alow: "
                            r"unknown key.*", line["error"]), line
        assert conn.execute("INSERT INTO su_orders VALUES (3)").rowcount == 1
        with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert re.search(r'pgguard_policy_reloads_total\{result="error"\} [1-9]', text)

        # A good new file: a role matched first that denies writes.
        new = json.loads(json.dumps(good))
        new["roles"] = {"readonly": {"users": ["app"], "allow": ["read", "tx", "pii"],
                                     "step_up": {"pii": "30m"}}, **good["roles"]}
        rewrite(proxy, json.dumps(new, indent=1))
        wait_log(proxy, "policy.reloaded")
        with pytest.raises(pgerr.InsufficientPrivilege) as exc:
            conn.execute("INSERT INTO su_orders VALUES (4)")
        assert re.fullmatch(r"pgguard: role readonly may not run write \(.*su_orders\)",
                            exc.value.diag.message_primary), exc.value.diag.message_primary
        assert conn.execute("SELECT count(*) FROM su_orders").fetchone() == (3,)
    assert su.orders_count(pg) == 3
    results = [e["result"] for e in su.wait_audit_count(proxy, "policy.reload", 3)]
    assert "error" in results and results[-1] == "ok"
