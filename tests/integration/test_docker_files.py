"""docker/ without a Docker engine: the Dockerfile's install and start commands replayed, the
HEALTHCHECK run against a real admin server, the sample config loaded by pgguard's own loader,
the dashboard and alert rules checked against the metric names pgguard exports, `promtool check`
from Debian's prometheus package, and the compose file's wiring (plus `docker compose config`
where the Docker client has the compose plugin)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pgguard.admin import build_admin_app, start_admin
from pgguard.config import load_config
from pgguard.localpg import free_port
from pgguard.observability.metrics import Metrics
from tests.integration.prom import PrometheusBins, iter_rule_exprs, prometheus_bins

__all__ = ["prometheus_bins"]  # the fixture, imported for pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
METRIC = re.compile(r"\b((?:pgguard|process|python)_[a-z0-9_]+)\b")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def exported_names() -> set[str]:
    """Every sample name a pgguard /metrics page has (with _bucket, _count, _total ...)."""
    text = Metrics(CollectorRegistry()).exposition().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_dockerfile_shape() -> None:
    (base,) = instruction("FROM")
    assert re.fullmatch(r"python:3\.\d+-slim", base)
    users = instruction("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any("pip install ." in r for r in instruction("RUN"))
    (entry,) = instruction("ENTRYPOINT")
    assert json.loads(entry) == ["pgguard", "run", "--config", "/etc/pgguard/pgguard.yaml"]
    (health,) = instruction("HEALTHCHECK")
    assert "/healthz" in health and "CMD" in health
    assert set(" ".join(instruction("EXPOSE")).split()) == {"6433", "9433"}
    for copy in instruction("COPY"):
        *sources, _ = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), src


def test_install_and_entrypoint_replayed(tmp_path: Path) -> None:
    """COPY what the Dockerfile copies, `pip install` it (no deps: the venv has them), and run
    the ENTRYPOINT's program with --help from the installed copy."""
    src = tmp_path / "src"
    src.mkdir()
    for copy in instruction("COPY"):
        *sources, _ = copy.split()
        for s in sources:
            if (ROOT / s).is_dir():
                # As .dockerignore: sources only (no caches, no locally compiled modules).
                shutil.copytree(ROOT / s, src / s, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.pyc", "*.so", "*.c"))
            else:
                shutil.copy2(ROOT / s, src / s)
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--target", str(site), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{site / 'bin'}:{os.environ['PATH']}"}
    where = subprocess.run([sys.executable, "-c", "import pgguard, pathlib; p = pathlib.Path("
                            "pgguard.__file__).parent; print(p); "
                            "assert (p / 'classify' / 'builtin_functions.json').exists()"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(site))
    entry = json.loads(instruction("ENTRYPOINT")[0])
    assert shutil.which(entry[0], path=env["PATH"]) == str(site / "bin" / "pgguard")
    run = subprocess.run([*entry, "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--config" in run.stdout and "Run the proxy" in run.stdout


def test_sample_config_loads() -> None:
    config = load_config(DOCKER / "pgguard.yaml", {})
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 6433)
    assert config.admin.listen.port == 9433
    assert str(config.upstream) == "postgres:5432"
    assert config.audit.path and config.audit.path.startswith("/var/lib/pgguard/")


def test_healthcheck_command_against_a_real_admin_server() -> None:
    (health,) = instruction("HEALTHCHECK")
    argv = json.loads(health.split("CMD", 1)[1].strip())
    assert argv[0] == "python"

    async def ready() -> tuple[bool, str]:
        return True, "ok"

    def check(port: int) -> int:
        cmd = [sys.executable, *[a.replace(":9433/", f":{port}/") for a in argv[1:]]]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    async def scenario() -> None:
        server = await start_admin(build_admin_app(CollectorRegistry(), ready, None),
                                   "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        try:
            assert await loop.run_in_executor(None, check, server.port) == 0
        finally:
            await server.stop()
        assert await loop.run_in_executor(None, check, free_port()) != 0

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "pgguard.json").read_text())
    exported = exported_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used and used <= exported, used - exported
    # Each thing the issue asks the dashboard to show.
    joined = "\n".join(exprs)
    for needle in ("pgguard_client_connections", "sum by (decision) (rate(pgguard_statements",
                   "sum by (sensitivity) (rate(pgguard_statements",
                   "histogram_quantile(0.5, sum by (le) (rate(pgguard_statement_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(pgguard_statement_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(pgguard_classify_seconds_bucket",
                   "pgguard_holds_active", "pgguard_stepup_total", "pgguard_upstream_errors_total"):
        assert needle in joined, needle
    # The dashboard's datasource is the one provisioned.
    ds = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" /
                         "prometheus.yml").read_text())["datasources"][0]
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}


def test_alert_rules(prometheus_bins: PrometheusBins) -> None:
    rules = DOCKER / "alerts.yml"
    exported = exported_names() | {"up"}
    exprs = list(iter_rule_exprs(rules))
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used <= exported, used - exported
    assert {"pgguard_stepup_total", "pgguard_audit_errors_total",
            "pgguard_upstream_errors_total", "pgguard_hold_seconds_count"} <= used
    names = {r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]}
    assert {"PgguardStepupFailureSpike", "PgguardLockouts", "PgguardAuditWriteErrors",
            "PgguardUpstreamDown", "PgguardHoldTimeoutsRising"} <= names
    for args in (["check", "rules", str(rules)],
                 ["check", "config", str(DOCKER / "prometheus.yml")]):
        out = subprocess.run([str(prometheus_bins.promtool), *args], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr


def test_compose_wiring() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"postgres", "pgguard", "prometheus", "grafana"}
    build = services["pgguard"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    for svc in services.values():
        for vol in svc.get("volumes", []):
            host = vol.split(":")[0]
            if host.startswith("."):
                assert (DOCKER / host).exists(), vol
    # Prometheus scrapes the pgguard service on the admin port pgguard.yaml listens on.
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    sample = yaml.safe_load((DOCKER / "pgguard.yaml").read_text())
    assert target == f"pgguard:{sample['admin']['listen'].rsplit(':', 1)[1]}"
    assert sample["upstream"].split(":")[0] in services
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "./alerts.yml:/etc/prometheus/alerts.yml" in mounts
    assert prom["rule_files"] == ["alerts.yml"]
    # The entrypoint's config path is where compose mounts the sample.
    assert "./pgguard.yaml:/etc/pgguard/pgguard.yaml:ro" in services["pgguard"]["volumes"]


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_when_the_client_has_it() -> None:
    """`docker compose config` needs no engine; where no compose client is installed the
    structural checks of test_compose_wiring stand alone."""
    cli = _compose_cli()
    if cli is None:
        assert shutil.which("docker-compose") is None
        return
    out = subprocess.run([*cli, "-f", str(DOCKER / "docker-compose.yml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60, cwd=DOCKER)
    assert out.returncode == 0, shlex.join(cli) + ": " + out.stderr


@pytest.mark.parametrize("name", ["docker-compose.yml", "prometheus.yml", "alerts.yml",
                                  "pgguard.yaml"])
def test_yaml_files_parse(name: str) -> None:
    assert isinstance(yaml.safe_load((DOCKER / name).read_text()), dict)
