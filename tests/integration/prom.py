"""A real Prometheus for tests: Debian's `prometheus` and `promtool` (installed on first use when
we are root, as `make test` on CI is), a server on 127.0.0.1 with a temporary data folder, and a
small client for its HTTP API.

    from tests.integration.prom import PrometheusServer, prometheus_bins  # noqa: F401 (fixture)

    def test_x(prometheus_bins):
        with PrometheusServer(prometheus_bins.prometheus, targets=["127.0.0.1:9433"]) as prom:
            prom.wait_for('pgguard_statements_total{decision="allowed"}', lambda v: v >= 1)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pgguard.localpg import free_port

__all__ = ["PrometheusBins", "PrometheusServer", "find_or_install_prometheus", "prometheus_bins"]


@dataclass(frozen=True)
class PrometheusBins:
    prometheus: Path
    promtool: Path


def _which() -> PrometheusBins | None:
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if prom and tool:
        return PrometheusBins(Path(prom), Path(tool))
    return None


def find_or_install_prometheus() -> PrometheusBins:
    """The binaries; when missing and we are root, `apt-get install -y prometheus` (after
    `apt-get update` if the first try fails). The package's service is not started (no init in
    containers; policy-rc.d) and we never use it: tests run their own server."""
    found = _which()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("prometheus/promtool are missing: apt-get install -y prometheus "
                    "(Debian's package) and run the tests again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            pytest.fail(f"apt-get install prometheus failed: {out.stderr[-2000:]}")
    found = _which()
    if not found:
        pytest.fail("apt-get installed prometheus but the binaries are not on PATH")
    return found


@pytest.fixture(scope="session")
def prometheus_bins() -> PrometheusBins:
    return find_or_install_prometheus()


class PrometheusServer:
    """Our own Prometheus child process scraping `targets` every `scrape_interval`."""

    def __init__(self, binary: Path, targets: Sequence[str], *, job: str = "pgguard",
                 scrape_interval: str = "1s", rule_files: Sequence[Path] = ()) -> None:
        self.binary = binary
        self.targets = list(targets)
        self.job = job
        self.scrape_interval = scrape_interval
        self.rule_files = list(rule_files)
        self.port = 0
        self.base: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        self.base = Path(tempfile.mkdtemp(prefix="pgguard-prom-"))
        config = {
            "global": {"scrape_interval": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": self.job, "scrape_timeout": "1s"
                                if self.scrape_interval == "1s" else "10s",
                                "static_configs": [{"targets": self.targets}]}],
        }
        (self.base / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        log = (self.base / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [str(self.binary), f"--config.file={self.base / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.base / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = self.log()
                self.stop()
                raise RuntimeError(f"prometheus did not start:\n{log_text[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return (self.base / "prometheus.log").read_text(errors="replace") if self.base else ""
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> object:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: [(labels, value)]."""
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def targets_health(self) -> list[str]:
        data = self.api("targets")
        assert isinstance(data, dict)
        return [t["health"] for t in data["activeTargets"]]

    def wait_for(self, expr: str, predicate: Callable[[float], bool],
                 timeout: float = 30.0) -> float:
        """Poll `expr` until one series' value satisfies `predicate`; returns that value."""
        deadline = time.monotonic() + timeout
        seen: list[tuple[dict[str, str], float]] = []
        while time.monotonic() < deadline:
            seen = self.query(expr)
            for _, v in seen:
                if predicate(v):
                    return v
            time.sleep(0.3)
        raise AssertionError(f"{expr}: still {seen} after {timeout} s; targets "
                             f"{self.targets_health()}\n{self.log()[-2000:]}")


def iter_rule_exprs(rules_file: Path) -> Iterator[str]:
    for group in yaml.safe_load(rules_file.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]
