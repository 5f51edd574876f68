"""Run `pgguard run` as a real subprocess on a free port, for integration and client tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pgguard.localpg import LocalPostgres, free_port


class ProxyProcess:
    def __init__(self, pg: LocalPostgres, workdir: Path, config: dict, *, via_socket: bool,
                 extra_args: list[str]) -> None:
        self.pg = pg
        self.workdir = workdir
        self.config = dict(config)
        self.via_socket = via_socket
        self.extra_args = extra_args
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "pgguard.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "pgguard.yaml"

    def dsn(self, user: str = "app", password: str | None = None, dbname: str = "app",
            **extra: str) -> str:
        return self.pg.dsn(user=user, password=password, dbname=dbname, port=self.port, **extra)

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "listen": f"127.0.0.1:{self.port}",
            "upstream": str(self.pg.socket_dir) if self.via_socket else f"127.0.0.1:{self.pg.port}",
        }
        if self.via_socket:
            cfg["upstream_port"] = self.pg.port
        admin = {"listen": f"127.0.0.1:{self.admin_port}", **self.config.get("admin", {})}
        self.admin_port = int(str(admin["listen"]).rpartition(":")[2])
        cfg.update(self.config)
        cfg["admin"] = admin
        cfg_path = self.workdir / "pgguard.yaml"
        # JSON is YAML: no extra dependency in the test harness to write it.
        cfg_path.write_text(json.dumps(cfg, indent=1))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgguard", "run", "--config", str(cfg_path), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgguard exited ({self.proc.returncode}):\n{self.log()}")
            try:
                # the proxy listens first, the admin server right after: wait for both
                for port in (self.port, self.admin_port):
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        pass
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgguard did not listen in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode
