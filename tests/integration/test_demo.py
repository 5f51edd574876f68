"""`make demo` runs `python -m pgguard demo`: it must come up, serve psql, and stop cleanly."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(120)


def test_demo_serves_psql_and_stops_on_ctrl_c(tmp_path):
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pgguard", "demo"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        line = None
        while time.monotonic() < deadline and line is None:
            assert proc.poll() is None, log.read_text()
            m = re.search(r'psql "([^"]+)"', log.read_text())
            line = m.group(1) if m else None
            time.sleep(0.2)
        assert line, log.read_text()
        conninfo = dict(kv.split("=", 1) for kv in shlex.split(line))
        env = {**os.environ, "PGPASSWORD": conninfo.pop("password")}
        dsn = " ".join(f"{k}={v}" for k, v in conninfo.items())
        out = subprocess.run(["psql", "-X", "-A", "-t", dsn, "-c", "select count(*) from orders",
                              "-c", "select count(email) from users"],
                             capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["5000", "200"]
        pg_port = int(re.search(r"on 127\.0\.0\.1:(\d+), database app", log.read_text()).group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    assert rc == 0, log.read_text()
    assert "pgguard demo: stopped." in log.read_text()
    # the embedded server is gone with it
    probe = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(pg_port)],
                           capture_output=True)
    assert probe.returncode != 0
