"""A real scrape: Debian's Prometheus server scrapes pgguard's admin server every second and its
HTTP API shows the counters we increment, with pgguard's alert rules loaded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from pgguard.admin import build_admin_app, start_admin
from pgguard.classify import StatementClass as C
from pgguard.observability.metrics import Metrics
from tests.integration.prom import PrometheusBins, PrometheusServer, prometheus_bins

__all__ = ["prometheus_bins"]  # the fixture, imported for pytest

ALERTS = Path(__file__).resolve().parents[2] / "docker" / "alerts.yml"


def test_prometheus_scrapes_the_admin_server(prometheus_bins: PrometheusBins) -> None:
    async def ready() -> tuple[bool, str]:
        return True, "ok"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        server = await start_admin(build_admin_app(registry, ready, None), "127.0.0.1", 0)
        prom = PrometheusServer(prometheus_bins.prometheus, [f"127.0.0.1:{server.port}"],
                                rule_files=[ALERTS])
        try:
            await loop.run_in_executor(None, prom.start)
            series = 'pgguard_statements_total{decision="allowed",sensitivity="read"}'
            # Pre-initialised: the series exists at 0 before any statement.
            await loop.run_in_executor(None, prom.wait_for, series, lambda v: v == 0)
            for _ in range(3):
                metrics.count_statement("allowed", {C.READ})
            await loop.run_in_executor(None, prom.wait_for, series, lambda v: v == 3)
            for _ in range(4):
                metrics.count_statement("allowed", frozenset({C.READ, C.TX}))
            await loop.run_in_executor(None, prom.wait_for, series, lambda v: v == 7)
            assert await loop.run_in_executor(None, prom.targets_health) == ["up"]
            up = await loop.run_in_executor(None, prom.query, 'up{job="pgguard"}')
            assert [v for _, v in up] == [1.0]
            # The alert rules loaded and evaluate against the real series.
            groups = await loop.run_in_executor(None, prom.api, "rules")
            assert isinstance(groups, dict)
            names = {r["name"] for g in groups["groups"] for r in g["rules"]}
            assert {"PgguardAuditWriteErrors", "PgguardUpstreamDown", "PgguardLockouts"} <= names
            assert all(r["health"] in ("ok", "unknown") for g in groups["groups"]
                       for r in g["rules"])
        finally:
            await loop.run_in_executor(None, prom.stop)
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), 120))
