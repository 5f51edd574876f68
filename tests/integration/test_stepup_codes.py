"""The step-up API and CLI refusing codes (DESIGN §6): wrong code 401, replayed code 409,
another user's code 401, unknown session 404, lockout after 5 failures 429 (also for the right
code, and still after a restart), admin unreachable. A refused code never releases the hold."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from pgguard.localpg import LocalPostgres, free_port
from tests.integration import stepup_env as su

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.parametrize("pg", ["pg18"], indirect=True)]


@pytest.fixture
def env(pg: LocalPostgres, proxy_factory):
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(hold_timeout="30s"))
    return proxy, su.enroll(proxy)


def connect(proxy) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)


def session_id(conn: psycopg.Connection) -> str:
    return str(conn.execute("SHOW pgguard.session_id").fetchone()[0])


def test_wrong_replayed_and_foreign_codes_keep_the_hold(env) -> None:
    proxy, secret = env
    bob = su.enroll(proxy, "bob")  # a second user; PostgreSQL does not need to know him
    codes = su.Codes(secret)
    with connect(proxy) as conn:
        sid = session_id(conn)
        held = su.Background(lambda: conn.execute(su.PII_SQL).fetchall())
        su.wait_for_hold(proxy, sid)

        status, body = su.post_code(proxy, sid, su.wrong_code(secret))
        assert status == 401 and set(body) == {"error"}, body
        cli = su.stepup_cli(proxy, sid, "--code", su.wrong_code(secret))
        assert cli.returncode == 1
        assert cli.stderr.startswith("pgguard: step-up refused (bad code): "), cli.stderr
        # Bob's current code is a bad code for app's session.
        status, body = su.post_code(proxy, sid, su.Codes(bob).next())
        assert status == 401, body
        assert [h["session"] for h in su.holds(proxy)] == [sid] and not held.done()

        good = codes.next()
        status, body = su.post_code(proxy, sid, good)
        assert status == 200 and body["released"] is True, body
        assert held.result(10) == su.EMAILS

        # The same code again: 409, whether or not something is held.
        status, body = su.post_code(proxy, sid, good)
        assert status == 409 and set(body) == {"error"}, body
        cli = su.stepup_cli(proxy, sid, "--code", good)
        assert cli.returncode == 1
        assert cli.stderr.startswith("pgguard: step-up refused (code already used): ")

    reasons = [e["reason"] for e in su.wait_audit_count(proxy, "stepup.failure", 5)]
    assert reasons == ["bad_code", "bad_code", "bad_code", "replay", "replay"]
    # No code, secret or password in the audit trail.
    text = (proxy.workdir / "audit.jsonl").read_text()
    assert good not in text and secret not in text and bob not in text


def test_unknown_session_and_unreachable_admin(env) -> None:
    proxy, secret = env
    status, body = su.post_code(proxy, "zzzzzzzzzzzz", su.Codes(secret).next())
    assert (status, body) == (404, {"error": "no session zzzzzzzzzzzz"})
    cli = su.stepup_cli(proxy, "zzzzzzzzzzzz", "--code", "123456")
    assert cli.returncode == 1
    assert cli.stderr == ("pgguard: step-up refused (unknown session): "
                          "no session zzzzzzzzzzzz\n")
    nobody = subprocess.run(
        [sys.executable, "-m", "pgguard", "stepup", "abcdefabcdef", "--code", "123456",
         "--admin-url", f"http://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30)
    assert nobody.returncode == 3, nobody.stderr
    assert nobody.stderr.startswith("pgguard: ") and "Traceback" not in nobody.stderr
    assert len(nobody.stderr.strip().splitlines()) == 1


def test_lockout_after_five_failures_also_for_the_right_code_and_across_restart(env) -> None:
    proxy, secret = env
    codes = su.Codes(secret)
    with connect(proxy) as conn:
        sid = session_id(conn)
        held = su.Background(lambda: conn.execute(su.PII_SQL).fetchall())
        su.wait_for_hold(proxy, sid)
        wrong = su.wrong_code(secret)
        statuses = [su.post_code(proxy, sid, wrong)[0] for _ in range(5)]
        assert statuses == [401] * 5
        status, body = su.post_code(proxy, sid, codes.next())
        assert status == 429 and "error" in body, body
        cli = su.stepup_cli(proxy, sid, "--code", codes.next())
        assert cli.returncode == 1
        assert cli.stderr.startswith("pgguard: step-up refused (locked out): ")
        assert not held.done(), "a locked-out step-up must not release the statement"
        conn.cancel_safe(timeout=5)
        with pytest.raises(psycopg.errors.QueryCanceled):
            held.result(10)

    # The lockout is in the state store: it survives a restart of pgguard.
    proxy.stop()
    proxy.start()
    with connect(proxy) as conn:
        sid = session_id(conn)
        status, body = su.post_code(proxy, sid, su.Codes(secret).next())
        assert status == 429, body
    failures = su.wait_audit_count(proxy, "stepup.failure", 8)
    assert [e["reason"] for e in failures] == ["bad_code"] * 5 + ["locked"] * 3
