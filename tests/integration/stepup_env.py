"""What the step-up integration tests (test_stepup_*.py) share: the schema, a policy, enrolling
users, codes, calling the step-up API and CLI, waiting for holds, reading the audit.

Everything here talks to real processes: the `pgguard run` of `proxy_factory`, the
`pgguard enroll` / `pgguard stepup` commands, the admin API over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pyotp

from pgguard.localpg import LocalPostgres
from tests.proxyproc import ProxyProcess

PII_SQL = "SELECT email FROM su_users ORDER BY id"
EMAILS = [("u1@example.com",), ("u2@example.com",), ("u3@example.com",)]
ALL_BUT_DDL = ["read", "write", "pii", "tx", "unknown"]


def make_schema(pg: LocalPostgres) -> None:
    """su_users (3 rows, email is PII), su_big (250 rows, PII), su_orders (empty, writable)."""
    pg.psql("""
        DROP TABLE IF EXISTS su_users, su_big, su_orders;
        CREATE TABLE su_users (id int PRIMARY KEY, email text);
        INSERT INTO su_users SELECT i, 'u' || i || '@example.com' FROM generate_series(1, 3) i;
        CREATE TABLE su_big (id int PRIMARY KEY, email text);
        INSERT INTO su_big SELECT i, 'b' || i || '@example.com' FROM generate_series(1, 250) i;
        CREATE TABLE su_orders (id int);
        ALTER TABLE su_users OWNER TO app; ALTER TABLE su_big OWNER TO app;
        ALTER TABLE su_orders OWNER TO app;
    """, dbname="app")


def orders_count(pg: LocalPostgres) -> int:
    return int(pg.psql("SELECT count(*) FROM su_orders", dbname="app").strip())


def config(*, step_up: Any = None, allow: Any = None, hold_timeout: str = "20s",
           scope: str = "session", **more: Any) -> dict[str, Any]:
    """A policy where user `app` is in role `oncall`; PII selects need step-up."""
    cfg: dict[str, Any] = {
        "state": "sqlite:///state.db",
        "audit": {"path": "audit.jsonl", "fsync": "every"},
        "pii": {"tables": {"public.su_users": ["email"], "public.su_big": ["email"]}},
        "roles": {"oncall": {"users": ["app", "bob"], "allow": allow or ALL_BUT_DDL,
                             "step_up": step_up if step_up is not None else {"pii": "30m"}}},
        "hold": {"timeout": hold_timeout},
        "stepup": {"scope": scope},
    }
    cfg.update(more)
    return cfg


def enroll(proxy: ProxyProcess, user: str = "app") -> str:
    """`pgguard enroll USER --json` against the proxy's config; returns the TOTP secret."""
    out = subprocess.run([sys.executable, "-m", "pgguard", "enroll", user, "--json",
                          "--config", str(proxy.config_path)],
                         capture_output=True, text=True, timeout=30, cwd=proxy.workdir)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["user"] == user and body["uri"].startswith("otpauth://totp/")
    return str(body["secret"])


class Codes:
    """Successive valid codes of one secret: the current one, then the next time step's
    (±1 step is accepted and each accepted step must be later than the last)."""

    def __init__(self, secret: str) -> None:
        self.totp = pyotp.TOTP(secret)
        self.step = int(time.time() // 30) - 1

    def next(self) -> str:
        now_step = int(time.time() // 30)
        self.step = max(self.step + 1, now_step)
        assert self.step <= now_step + 1, "no fresh code left in this 30 s window"
        return str(self.totp.at(self.step * 30))


def wrong_code(secret: str) -> str:
    """A 6-digit code that matches none of the accepted time steps."""
    totp, now = pyotp.TOTP(secret), time.time()
    near = {totp.at(now + d) for d in (-60, -30, 0, 30, 60)}
    return next(c for c in (f"{i:06d}" for i in range(0, 1_000_000, 7919)) if c not in near)


def http(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_code(proxy: ProxyProcess, session: str, code: str) -> tuple[int, Any]:
    return http("POST", f"{proxy.admin_url}/api/v1/sessions/{session}/stepup", {"code": code})


def holds(proxy: ProxyProcess) -> list[dict[str, Any]]:
    status, body = http("GET", f"{proxy.admin_url}/api/v1/holds")
    assert status == 200, body
    return list(body["holds"])


def wait_for_hold(proxy: ProxyProcess, session: str | None = None, count: int = 1,
                  timeout: float = 15) -> list[dict[str, Any]]:
    """Poll `GET /api/v1/holds` until `session` (or `count` sessions) is held."""
    deadline = time.monotonic() + timeout
    while True:
        pending = holds(proxy)
        if session is None and len(pending) >= count:
            return pending
        if session is not None and any(h["session"] == session for h in pending):
            return pending
        assert time.monotonic() < deadline, f"no hold for {session or count}: {pending}"
        time.sleep(0.05)


def wait_no_holds(proxy: ProxyProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while holds(proxy):
        assert time.monotonic() < deadline, f"holds left: {holds(proxy)}"
        time.sleep(0.05)


def stepup_cli(proxy: ProxyProcess, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`pgguard stepup ARGS --admin-url URL`."""
    return subprocess.run([sys.executable, "-m", "pgguard", "stepup", *args,
                           "--admin-url", proxy.admin_url],
                          capture_output=True, text=True, timeout=timeout)


def audit_events(proxy: ProxyProcess, event: str | None = None) -> list[dict[str, Any]]:
    path = proxy.workdir / "audit.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [e for e in lines if event is None or e["event"] == event]


def wait_audit(proxy: ProxyProcess, pred: Callable[[dict[str, Any]], bool],
               timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for e in audit_events(proxy):
            if pred(e):
                return e
        assert time.monotonic() < deadline, f"no such audit event in {audit_events(proxy)}"
        time.sleep(0.05)


def wait_audit_count(proxy: ProxyProcess, event: str, count: int,
                     timeout: float = 10) -> list[dict[str, Any]]:
    """The audit events named `event`, once there are at least `count` (writes are batched)."""
    deadline = time.monotonic() + timeout
    while len(found := audit_events(proxy, event)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {event} events: {found}"
        time.sleep(0.05)
    return found


def log_errors(proxy: ProxyProcess) -> list[str]:
    """Lines of the proxy log at level error or with a traceback."""
    return [line for line in proxy.log().splitlines()
            if '"level": "error"' in line or "Traceback" in line or "session.bug" in line]


def hint(proxy: ProxyProcess, session: str) -> str:
    return f"run `pgguard stepup {session}` or open {proxy.admin_url}/stepup/{session}"


class Background:
    """Run `fn` in a thread; `result()` returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.finished_at: float | None = None

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as exc:  # handed to the test thread
                self._error = exc
            self.finished_at = time.monotonic()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 30) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish"
        if self._error is not None:
            raise self._error
        return self._value
