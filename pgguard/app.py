"""Composition root: builds and wires everything, owns the event loop and the signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import structlog

from pgguard.classify.gucs import guc_is_harmless
from pgguard.config import Config
from pgguard.proxy.cancel import LocalCancelRegistry
from pgguard.proxy.guard import AllowAll, Guard, RefusePattern
from pgguard.proxy.server import ProxyContext, ProxyServer

log = structlog.get_logger("pgguard.app")

__all__ = ["App", "configure_logging", "run"]


def configure_logging(level: int = logging.INFO) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        guard: Guard = RefusePattern(config.refuse_pattern) if config.refuse_pattern else AllowAll()
        self.ctx = ProxyContext(config, guard, LocalCancelRegistry(), guc_is_harmless)
        self.server = ProxyServer(self.ctx)
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.server.start()
        await self._stop.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        """Stop accepting; idle sessions end now, busy ones when they become idle or when the
        grace period is over (FATAL 57P01, as PostgreSQL's own shutdown)."""
        grace = self.config.shutdown_grace
        log.info("proxy.shutdown", sessions=len(self.ctx.sessions), grace=grace)
        await self.server.stop_accepting()
        sessions = list(self.ctx.sessions)
        for s in sessions:
            s.begin_shutdown()
        waiting = [s.done for s in sessions if not s.done.done()]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=grace)
            if pending:
                from pgguard.proxy.session import _fatal_shutdown

                for s in list(self.ctx.sessions):
                    s.close(_fatal_shutdown())
        await asyncio.sleep(0.05)  # let transports flush the last FATALs
        await self.ctx.cancel_tasks()


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(config: Config) -> int:
    configure_logging()
    factory = _loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_main(config))


async def _main(config: Config) -> int:
    try:
        return await App(config).serve()
    except OSError as exc:
        log.error("proxy.start_failed", error=str(exc))
        print(f"pgguard: cannot listen on {config.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
