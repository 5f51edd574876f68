"""The admin HTTP server (DESIGN §7): `/metrics`, `/healthz`, `/readyz`, and the token guard for
`/api/v1/`.

    app = build_admin_app(registry, readiness=all_ready(upstream=..., state=...), token=token)
    add_routes(app, [web.get("/api/v1/holds", list_holds),
                     web.post("/api/v1/sessions/{id}/stepup", stepup)], public=True)
    add_routes(app, [web.get("/api/v1/...", handler)])         # needs the admin token
    server = await start_admin(app, "127.0.0.1", 9433)         # server.port if 0 was asked
    ...
    await server.stop()

Routes must be added before `start_admin` (aiohttp freezes the router then). Every path under
`/api/v1/` needs `Authorization: Bearer <admin token>` unless its handler was added with
`public=True`; DESIGN §6 makes exactly two endpoints public (the step-up code is their
credential). With no token configured, the protected endpoints answer 401 to everyone.
Errors are JSON `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pgguard.admin.probe import Readiness

__all__ = ["API_PREFIX", "AdminServer", "ReadinessCache", "add_routes", "build_admin_app",
           "json_error", "start_admin"]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"
READINESS_TTL = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PUBLIC = web.AppKey("pgguard_public_handlers", set)
_TOKEN = web.AppKey("pgguard_admin_token", bytes)
_REGISTRY = web.AppKey("pgguard_registry", CollectorRegistry)


def json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class ReadinessCache:
    """Runs the readiness probe at most once per `ttl` seconds (concurrent requests share one
    run), so `/readyz` reflects a change within `ttl` + the probe's own timeout."""

    def __init__(self, probe: Readiness, *, ttl: float = READINESS_TTL,
                 timeout: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        self._result: tuple[bool, str] | None = None
        self._at = 0.0

    async def get(self) -> tuple[bool, str]:
        if self._fresh():
            assert self._result is not None
            return self._result
        async with self._lock:
            if not self._fresh():  # someone else may have probed while we waited
                self._result = await self._run()
                self._at = self._clock()
            assert self._result is not None
            return self._result

    def _fresh(self) -> bool:
        return self._result is not None and self._clock() - self._at < self._ttl

    async def _run(self) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(self._timeout):
                ok, reason = await self._probe()
            return bool(ok), str(reason)
        except TimeoutError:
            return False, f"readiness probe took longer than {self._timeout:g} s"
        except Exception as exc:  # a probe bug must read as "not ready", not as a 500
            log.exception("readiness probe failed")
            return False, f"readiness probe failed: {exc}"


_READINESS = web.AppKey("pgguard_readiness", ReadinessCache)


@web.middleware
async def _token_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    route = request.match_info.route
    method = "GET" if route.method == "HEAD" else route.method
    if route.resource is not None and (route.resource, method) in request.app[_PUBLIC]:
        return await handler(request)
    expected = request.app[_TOKEN]
    if not expected:
        return json_error(401, "the admin API is disabled: no admin token is configured",
                          **{"WWW-Authenticate": "Bearer"})
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        return json_error(401, "a valid admin token is required (Authorization: Bearer ...)",
                          **{"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def _metrics(request: web.Request) -> web.Response:
    # Collecting reads /proc (process collector): off the event loop the relay runs on.
    body = await asyncio.get_running_loop().run_in_executor(
        None, generate_latest, request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ok, reason = await request.app[_READINESS].get()
    if ok:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "reason": reason}, status=503)


def build_admin_app(metrics_registry: CollectorRegistry, readiness: Readiness,
                    token: str | None, *, readiness_ttl: float = READINESS_TTL,
                    readiness_timeout: float = 5.0) -> web.Application:
    """The admin application: /metrics, /healthz, /readyz and the /api/v1/ token guard."""
    app = web.Application(middlewares=[_token_guard])
    app[_REGISTRY] = metrics_registry
    app[_TOKEN] = (token or "").encode()
    app[_PUBLIC] = set()
    app[_READINESS] = ReadinessCache(readiness, ttl=readiness_ttl, timeout=readiness_timeout)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


def add_routes(app: web.Application, routes: Iterable[web.AbstractRouteDef], *,
               public: bool = False) -> None:
    """Add routes (`web.get(...)`, `web.post(...)`, a `web.RouteTableDef`) to the admin app.
    `public=True` exempts these routes (path and method) from the admin token (DESIGN §6's two endpoints)."""
    for route in app.router.add_routes(routes):
        if public and route.resource is not None:
            app[_PUBLIC].add((route.resource, route.method))


@dataclass
class AdminServer:
    """A running admin server; `port` is the bound port (useful when 0 was asked)."""

    runner: web.AppRunner
    site: web.TCPSite
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (aiohttp's shutdown timeout), clean up."""
        await self.runner.cleanup()


async def start_admin(app: web.Application, host: str, port: int, *,
                      shutdown_timeout: float = 5.0) -> AdminServer:
    """Serve `app` on host:port (port 0: any free port). Raises OSError if it cannot bind."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    return AdminServer(runner, site, host, bound)
