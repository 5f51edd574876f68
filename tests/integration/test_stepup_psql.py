"""Step-up as a psql user lives it (DESIGN §1): the PII select is held with the NOTICE, a
concurrent `pgguard stepup` releases it and the rows arrive in the same psql invocation; and
transaction consistency when a held statement times out or a statement is denied (DESIGN §3:
`BEGIN; INSERT; <refused>; COMMIT` answers ROLLBACK and commits nothing).

The transaction tests run on both servers: what psql sees there depends on the server executing
pgguard's poison and substitutions."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time

import pytest

from pgguard.localpg import LocalPostgres
from tests.integration import stepup_env as su

pytestmark = pytest.mark.timeout(120)

NOTICE = re.compile(r"^NOTICE:  pgguard: statement held: step-up required \((?P<what>.*)\)$")


class Psql:
    """psql reading a script from stdin; stderr lines are collected as they come."""

    def __init__(self, proxy, script: str, *extra: str) -> None:
        env = {**os.environ, "PGPASSWORD": proxy.pg.password, "PGCONNECT_TIMEOUT": "10"}
        self.proc = subprocess.Popen(
            ["psql", "-X", *extra, proxy.dsn()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.write(script)
        self.proc.stdin.close()
        self.err_lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            self.err_lines.put(line.rstrip("\n"))

    def next_err(self, timeout: float = 15) -> str:
        return self.err_lines.get(timeout=timeout)

    def finish(self, timeout: float = 30) -> tuple[int, str, list[str]]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc, out, self.stderr


@pytest.fixture
def setup(pg: LocalPostgres, proxy_factory):
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config())
    return proxy, su.enroll(proxy)


ONE_SERVER = pytest.mark.parametrize("pg", ["pg18"], indirect=True)


@ONE_SERVER
def test_psql_held_select_released_by_stepup_cli(setup) -> None:
    proxy, secret = setup
    psql = Psql(proxy, f"SHOW pgguard.session_id;\nSELECT count(*) FROM su_users;\n{su.PII_SQL};\n",
                "-q", "-A", "-t")
    notice = psql.next_err()
    m = NOTICE.match(notice)
    assert m, notice
    assert m["what"] == "pii: public.su_users.email"
    detail, hint = psql.next_err(), psql.next_err()
    sid = re.fullmatch(r"DETAIL:  session ([a-z0-9]{12,}), user app, waiting up to 20 s", detail)
    assert sid, detail
    session = sid[1]
    assert hint == f"HINT:  {su.hint(proxy, session)}"
    time.sleep(0.3)
    assert psql.proc.poll() is None, "psql must still be waiting for the held statement"

    cli = su.stepup_cli(proxy, session, "--code", su.Codes(secret).next())
    assert cli.returncode == 0, cli.stderr
    assert re.match(r"granted for app: pii until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n", cli.stdout)
    assert "the held statement is running" in cli.stdout

    rc, out, err = psql.finish()
    assert rc == 0, err
    # Same invocation: the session id, the plain read, then the released rows.
    assert out.splitlines() == [session, "3", "u1@example.com", "u2@example.com",
                                "u3@example.com"]
    assert err == [notice, detail, hint]
    ended = su.wait_audit(proxy, lambda e: e["event"] == "hold.end" and e["session"] == session)
    assert ended["outcome"] == "released"
    assert su.holds(proxy) == []


@ONE_SERVER
def test_stepup_cli_without_session_picks_the_pending_hold(setup) -> None:
    """A DBeaver user never sees the NOTICE: `pgguard stepup` lists the holds and takes the
    only one."""
    proxy, secret = setup
    psql = Psql(proxy, f"{su.PII_SQL};\n", "-q", "-A", "-t")
    [hold] = su.wait_for_hold(proxy)
    assert hold["user"] == "app" and hold["client_addr"] == "127.0.0.1"
    assert hold["classes"] == ["pii"]
    cli = su.stepup_cli(proxy, "--code", su.Codes(secret).next())
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith(f"1) {hold['session']}  app from 127.0.0.1  ")
    rc, out, err = psql.finish()
    assert rc == 0 and out.split() == [e[0] for e in su.EMAILS], err


def test_psql_hold_timeout_in_transaction_commits_nothing(pg: LocalPostgres,
                                                          proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(hold_timeout="3s"))
    su.enroll(proxy)
    script = ("BEGIN;\nINSERT INTO su_orders VALUES (1);\nSHOW pgguard.session_id;\n"
              f"{su.PII_SQL};\nSHOW pgguard.status;\nCOMMIT;\nSELECT 'after';\n")
    t0 = time.monotonic()
    psql = Psql(proxy, script, "-A", "-t", "-v", "VERBOSITY=verbose")
    rc, out, err = psql.finish()
    assert 3 <= time.monotonic() - t0 < 15
    assert rc == 0, err
    lines = out.splitlines()
    session = lines[2]
    held = ("NOTICE:  01000: pgguard: statement held: step-up required "
            "(pii: public.su_users.email)")
    assert [e for e in err if not e.startswith("LOCATION:")] == [
        held,
        f"DETAIL:  session {session}, user app, waiting up to 3 s",
        f"HINT:  {su.hint(proxy, session)}",
        "ERROR:  42501: pgguard: step-up required; hold timed out after 3 s",
        f"HINT:  {su.hint(proxy, session)}",
        "ERROR:  25P02: current transaction is aborted, commands ignored until end of "
        "transaction block",
    ], err
    assert lines == ["BEGIN", "INSERT 0 1", session, "ROLLBACK", "after"], out
    assert su.orders_count(pg) == 0


def test_psql_denial_in_transaction_commits_nothing(pg: LocalPostgres, proxy_factory) -> None:
    su.make_schema(pg)
    proxy = proxy_factory(pg, su.config(allow=["read", "tx", "pii", "write"],
                                        step_up={"pii": "30m"}))
    script = ("BEGIN;\nINSERT INTO su_orders VALUES (1);\nCREATE TABLE su_x (id int);\n"
              "SHOW pgguard.status;\nCOMMIT;\n")
    psql = Psql(proxy, script, "-v", "VERBOSITY=verbose")
    rc, out, err = psql.finish()
    assert rc == 0, err
    assert out.split("\n")[:4] == ["BEGIN", "INSERT 0 1", "ROLLBACK", ""], out
    errors = [e for e in err if e.startswith("ERROR")]
    assert len(errors) == 2, err
    assert re.fullmatch(r"ERROR:  42501: pgguard: role oncall may not run ddl \(.*su_x.*\)",
                        errors[0]), errors
    assert errors[1].startswith("ERROR:  25P02: current transaction is aborted")
    assert su.orders_count(pg) == 0
    assert "su_x" not in pg.psql("SELECT string_agg(relname, ',') FROM pg_class", dbname="app")
