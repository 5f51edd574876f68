"""A bare TCP byte relay on asyncio.Protocol (uvloop when installed): the reference ceiling.

It understands nothing of the protocol and copies bytes both ways, with back-pressure. Run it as
an extra benchmark target (`BENCH_TARGETS=direct,pgbouncer,pgguard,relay`) to see how close
pgguard comes to what a Python relay can do at all on this machine (DESIGN §3):

    python -m benchmarks.bare_relay --listen 127.0.0.1:6500 --upstream 127.0.0.1:5432
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import cast


class _Half(asyncio.Protocol):
    """One side of a relayed connection; `peer` is the other side's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []  # bytes that arrived before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Back-pressure: when the peer cannot take more, stop reading from this side.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _ClientSide(_Half):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.connecting: asyncio.Task[None] | None = None  # held so it is not collected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            _, server = await asyncio.wait_for(
                loop.create_connection(_Half, *self.upstream), timeout=10)
        except (OSError, TimeoutError):
            self.transport.close()
            return
        server.peer, self.peer = self, server
        assert server.transport is not None
        for chunk in self.pending:
            server.transport.write(chunk)
        self.pending.clear()
        if self.transport.is_closing():
            server.transport.close()


async def _serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientSide(upstream), *listen)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_addr, required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", type=_addr, required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
