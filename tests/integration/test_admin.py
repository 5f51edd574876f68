"""The admin server for real: aiohttp on a free port, a real PostgreSQL as the upstream that
/readyz probes (our own LocalPostgres, stopped and started here), the /api/v1/ token guard."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from pgguard.admin import (
    ReadinessCache,
    add_routes,
    all_ready,
    build_admin_app,
    probe_upstream,
    start_admin,
)
from pgguard.config import Upstream
from pgguard.localpg import LocalPostgres, debian_bindir, embedded_bindir, free_port
from pgguard.observability.metrics import Metrics

TOKEN = "s3cret-admin-token"


def run(coro: Awaitable[None], deadline: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, deadline))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def upstream_pg() -> Iterator[LocalPostgres]:
    """A PostgreSQL of our own (we stop and start it). The machine's PostgreSQL has TLS on, so
    the probe's `S` path is exercised; the embedded one answers `N`."""
    bindir = debian_bindir()
    server = LocalPostgres(bindir, ssl=True) if bindir else LocalPostgres(embedded_bindir())
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def get(session: aiohttp.ClientSession, url: str, **kw) -> tuple[int, str, dict]:
    async with session.get(url, **kw) as r:
        return r.status, await r.text(), dict(r.headers)


def test_metrics_and_healthz() -> None:
    async def scenario() -> None:
        registry = CollectorRegistry()
        m = Metrics(registry)
        m.stepup["locked"].inc(2)

        async def ready() -> tuple[bool, str]:
            return True, "ok"

        server = await start_admin(build_admin_app(registry, ready, TOKEN), "127.0.0.1", 0)
        try:
            assert server.port > 0
            async with aiohttp.ClientSession() as s:
                status, body, headers = await get(s, f"{server.url}/metrics")
                assert status == 200
                assert headers["Content-Type"].startswith("text/plain; version=")
                assert 'pgguard_stepup_total{result="locked"} 2.0' in body
                assert "process_cpu_seconds_total" in body
                status, body, _ = await get(s, f"{server.url}/healthz")
                assert (status, body) == (200, '{"status": "ok"}')
                status, body, _ = await get(s, f"{server.url}/readyz")
                assert status == 200 and "ready" in body
        finally:
            await server.stop()
        # Stopped means the port is closed.
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectionError):
                await get(s, f"{server.url}/healthz")

    run(scenario())


def test_readyz_follows_the_upstream(upstream_pg: LocalPostgres) -> None:
    upstream = Upstream(host="127.0.0.1", port=upstream_pg.port)

    async def state_ok() -> tuple[bool, str]:
        return True, "ok"

    async def wait_status(s: aiohttp.ClientSession, url: str, want: int) -> tuple[float, str]:
        t0 = time.monotonic()
        while True:
            status, body, _ = await get(s, url)
            if status == want:
                return time.monotonic() - t0, body
            assert time.monotonic() - t0 < 10, f"/readyz still {status} {body}"
            await asyncio.sleep(0.2)

    async def scenario() -> None:
        readiness = all_ready(upstream=lambda: probe_upstream(upstream, timeout=2),
                              state=state_ok)
        app = build_admin_app(CollectorRegistry(), readiness, TOKEN, readiness_ttl=2.0)
        server = await start_admin(app, "127.0.0.1", 0)
        url = f"{server.url}/readyz"
        try:
            async with aiohttp.ClientSession() as s:
                await wait_status(s, url, 200)
                # Stop the upstream (our own child, by its pid), keeping its data.
                assert upstream_pg.proc is not None
                upstream_pg.proc.send_signal(signal.SIGINT)
                await asyncio.get_running_loop().run_in_executor(None, upstream_pg.proc.wait)
                _, body = await wait_status(s, url, 503)
                assert '"status": "not ready"' in body
                assert f"upstream: upstream 127.0.0.1:{upstream_pg.port}" in body
                await asyncio.get_running_loop().run_in_executor(None, upstream_pg.restart)
                await wait_status(s, url, 200)
        finally:
            await server.stop()

    run(scenario(), 90)


def test_probe_leaves_no_noise_in_the_server_log(upstream_pg: LocalPostgres) -> None:
    async def scenario() -> None:
        before = upstream_pg.server_log()
        tcp = Upstream(host="127.0.0.1", port=upstream_pg.port)
        sock = Upstream.parse(str(upstream_pg.socket_dir), upstream_port=upstream_pg.port)
        for _ in range(3):
            assert await probe_upstream(tcp) == (True, "ok")
            assert await probe_upstream(sock) == (True, "ok")
        await asyncio.sleep(0.5)  # let the server write whatever it would
        assert upstream_pg.server_log() == before

    run(scenario())


def test_probe_reports_a_closed_port_and_a_silent_peer() -> None:
    async def scenario() -> None:
        port = free_port()
        ok, reason = await probe_upstream(Upstream(host="127.0.0.1", port=port))
        assert not ok and f"127.0.0.1:{port}" in reason

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)
            writer.close()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        try:
            p = srv.sockets[0].getsockname()[1]
            t0 = time.monotonic()
            ok, reason = await probe_upstream(Upstream(host="127.0.0.1", port=p), timeout=0.5)
            assert not ok and "no answer within 0.5 s" in reason
            assert time.monotonic() - t0 < 2
        finally:
            srv.close()

    run(scenario())


def test_readiness_is_cached_and_errors_are_not_ready() -> None:
    now = [0.0]
    calls: list[int] = []
    answers = [(True, "ok"), (False, "down")]

    async def probe() -> tuple[bool, str]:
        calls.append(1)
        return answers[min(len(calls) - 1, 1)]

    async def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    async def scenario() -> None:
        cache = ReadinessCache(probe, ttl=5.0, clock=lambda: now[0])
        assert await cache.get() == (True, "ok")
        now[0] = 4.9
        assert await cache.get() == (True, "ok") and len(calls) == 1
        now[0] = 5.0
        assert await cache.get() == (False, "down") and len(calls) == 2
        assert await ReadinessCache(broken).get() == (False, "readiness probe failed: boom")

    run(scenario())


def test_token_guard() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, **request.match_info})

    async def ready() -> tuple[bool, str]:
        return True, "ok"

    async def scenario(token: str | None,
                       check: Callable[[aiohttp.ClientSession, str], Awaitable[None]]) -> None:
        app = build_admin_app(CollectorRegistry(), ready, token)
        add_routes(app, [web.get("/api/v1/holds", ok),
                         web.post("/api/v1/sessions/{id}/stepup", ok)], public=True)
        add_routes(app, [web.get("/api/v1/sessions", ok), web.delete("/api/v1/grants", ok)])
        server = await start_admin(app, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as s:
                await check(s, server.url)
        finally:
            await server.stop()

    good = {"Authorization": f"Bearer {TOKEN}"}

    async def with_token(s: aiohttp.ClientSession, base: str) -> None:
        # The two public endpoints of DESIGN §6, without a token.
        assert (await get(s, f"{base}/api/v1/holds"))[0] == 200
        async with s.post(f"{base}/api/v1/sessions/abcdefghijkl/stepup", json={}) as r:
            assert r.status == 200 and (await r.json())["id"] == "abcdefghijkl"
        # Everything else under /api/v1/ needs it.
        status, body, headers = await get(s, f"{base}/api/v1/sessions")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert "admin token" in body and body.startswith('{"error": ')
        assert (await get(s, f"{base}/api/v1/sessions",
                          headers={"Authorization": "Bearer wrong"}))[0] == 401
        assert (await get(s, f"{base}/api/v1/sessions",
                          headers={"Authorization": f"Basic {TOKEN}"}))[0] == 401
        assert (await get(s, f"{base}/api/v1/sessions", headers=good))[0] == 200
        async with s.delete(f"{base}/api/v1/grants") as r:
            assert r.status == 401
        async with s.delete(f"{base}/api/v1/grants", headers=good) as r:
            assert r.status == 200
        # Unknown API paths do not reveal themselves without the token.
        assert (await get(s, f"{base}/api/v1/nothing"))[0] == 401
        assert (await get(s, f"{base}/api/v1/nothing", headers=good))[0] == 404
        # Metrics and health need no token.
        assert (await get(s, f"{base}/metrics"))[0] == 200
        assert (await get(s, f"{base}/healthz"))[0] == 200

    async def without_token(s: aiohttp.ClientSession, base: str) -> None:
        status, body, _ = await get(s, f"{base}/api/v1/sessions", headers={"Authorization":
                                                                             "Bearer "})
        assert status == 401 and "no admin token is configured" in body
        assert (await get(s, f"{base}/api/v1/holds"))[0] == 200

    run(scenario(TOKEN, with_token))
    run(scenario(None, without_token))
