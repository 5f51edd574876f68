"""`make demo` runs `python -m pgguard demo`: it comes up, and what it prints works as printed.

One demo run, followed as a new user would: the printed psql line reads rows; a PII select is
held and released by the printed `pgguard stepup` command with a code from the printed `python
-c` line; a write then runs within the grant; the analyst is denied PII; the audit trail
verifies; Ctrl-C stops pgguard and the embedded server.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyotp
import pytest

pytestmark = pytest.mark.timeout(180)


def _psql(conninfo: str, *sql: str, **kwargs) -> subprocess.Popen[str]:
    argv = ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo]
    for s in sql:
        argv += ["-c", s]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PGSSLMODE": "disable"}, **kwargs)


def _wait_for(pattern: str, path: Path, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        assert proc.poll() is None, path.read_text(errors="replace")
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared:\n{path.read_text(errors='replace')}")


def _refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_demo_first_step_up_and_ctrl_c(tmp_path: Path) -> None:
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "pgguard", "demo"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stopped = False
    try:
        _wait_for(r"Ctrl-C stops pgguard and the database", log, demo, timeout=90)
        text = log.read_text()
        app_dsn = re.search(r'psql "([^"]*user=app [^"]*)"', text).group(1)
        analyst_dsn = re.search(r'psql "([^"]*user=analyst [^"]*)"', text).group(1)
        secret = re.search(r"secret\s+([A-Z2-7]{16,})", text).group(1)
        code_line = re.search(r"a code now\s+(.+)", text).group(1)
        stepup_line = re.search(r"^\s*(\S+ stepup <id> --admin-url \S+)$", text, re.M).group(1)
        pg_port = int(re.search(r"\(embedded\)\s+127\.0\.0\.1:(\d+)", text).group(1))
        proxy_port = int(re.search(r"pgguard\s+127\.0\.0\.1:(\d+)", text).group(1))
        admin_url = re.search(r"--admin-url (\S+)", stepup_line).group(1)
        audit = Path(re.search(r"audit trail\s+(\S+)", text).group(1))
        workdir = Path(re.search(r"work directory\s+(\S+)", text).group(1))
        assert "█" in text  # the QR code
        assert f"otpauth://totp/pgguard:app?secret={secret}" in text
        assert Path(shlex.split(stepup_line)[0]).parent == Path(sys.executable).parent

        # 1. a read runs at once
        read = _psql(app_dsn, "select count(*) from orders")
        out, err = read.communicate(timeout=30)
        assert read.returncode == 0, err
        assert out.split() == ["5000"]

        # 2. a PII select is held; the printed stepup command with the printed code line
        #    releases it; then (same session, within the grant) a write runs at once
        held_err = tmp_path / "held.err"
        with open(held_err, "w") as err_file:
            held = subprocess.Popen(
                ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", app_dsn,
                 "-c", "select count(email) from users",
                 "-c", "update orders set status = 'shipped' where id = 1",
                 "-c", "show pgguard.status"],
                stdout=subprocess.PIPE, stderr=err_file, text=True,
                env={**os.environ, "PGSSLMODE": "disable"})
        try:
            m = _wait_for(r"DETAIL:  session ([a-z0-9]{12,}), user app", held_err, held, 30)
            notice = held_err.read_text()
            assert "pgguard: statement held: step-up required (pii: public.users.email)" in notice
            assert f"{admin_url}/stepup/{m.group(1)}" in notice
            code = subprocess.run(["bash", "-c", code_line], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
            assert re.fullmatch(r"\d{6}", code)
            assert pyotp.TOTP(secret).verify(code, valid_window=1)
            argv = [*shlex.split(stepup_line.replace("<id>", m.group(1))), "--code", code]
            step = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert step.returncode == 0, step.stdout + step.stderr
            assert "granted for app: pii until" in step.stdout
            assert "the held statement is running" in step.stdout
            out, _ = held.communicate(timeout=30)
        finally:
            if held.poll() is None:
                held.kill()
        assert held.returncode == 0, held_err.read_text()
        rows = out.splitlines()
        assert rows[0] == "200"
        assert rows[1] == "UPDATE 1"
        assert re.search(r"role oncall, elevated: pii until \S+, write until", rows[2])

        # the analyst may read but is denied PII (42501)
        denied = _psql(analyst_dsn, "select email from users")
        _, err = denied.communicate(timeout=30)
        assert denied.returncode != 0
        assert "pgguard: role analyst may not run pii (public.users.email)" in err

        # the audit trail, where the demo said, verifies
        verify = subprocess.run([sys.executable, "-m", "pgguard", "audit", "verify", str(audit)],
                                capture_output=True, text=True, timeout=30)
        assert verify.returncode == 0, verify.stderr
        assert re.fullmatch(r"ok \d+ events\n", verify.stdout)
        events = audit.read_text()
        for event in ("enroll", "hold.start", "stepup.success", "hold.end", "statement"):
            assert f'"event":"{event}"' in events, event
        assert secret not in events

        # 3. Ctrl-C stops everything it started
        demo.send_signal(signal.SIGINT)
        rc = demo.wait(45)
        stopped = True
    finally:
        if not stopped:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(45)
            except subprocess.TimeoutExpired:
                demo.kill()
    assert rc == 0, log.read_text()
    assert "pgguard demo: stopped." in log.read_text()
    probe = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(pg_port)],
                           capture_output=True)
    assert probe.returncode != 0  # the embedded server is gone
    assert _refuses(proxy_port)
    assert _refuses(int(admin_url.rsplit(":", 1)[1]))
    assert not workdir.exists()
