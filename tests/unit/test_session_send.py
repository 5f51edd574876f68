"""The session's writes to its peers (session._send, _direct_fd): a reply goes straight to the
socket while nothing waits in the transport, and through the transport otherwise. Real
sockets on 127.0.0.1 and real uvloop transports; compiled and plain Python."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvloop

import pgguard.proxy._io as installed_io
import pgguard.proxy.session as installed
from tests.pure import compiled_or_pure, pure

PURE_IO = pure(installed_io)


@pytest.fixture(scope="module", params=["compiled", "pure"])
def module(request: pytest.FixtureRequest) -> ModuleType:
    return compiled_or_pure(request.param, installed, installed_io)


def _run(coro: Callable[[], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro())


async def _accepted(ssl_context: ssl.SSLContext | None = None
                    ) -> tuple[asyncio.Transport, socket.socket]:
    """A transport on the accepting side of a TCP connection on 127.0.0.1, and the other end
    (a blocking socket, not read yet)."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    listener.close()
    conn.setblocking(False)
    loop = asyncio.get_running_loop()
    if ssl_context is None:
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, conn)
        return transport, peer
    # The TLS handshake needs the client side to run meanwhile.
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    tls_peer = client_ctx.wrap_socket(peer, do_handshake_on_connect=False)
    handshake = loop.run_in_executor(None, tls_peer.do_handshake)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, conn, ssl=ssl_context)
    await handshake
    return transport, tls_peer


def test_send_keeps_the_order_when_the_socket_fills(module: ModuleType) -> None:
    """Sixteen MB in 4 KB replies to a peer that reads nothing yet: the first ones go straight
    to the socket, then it is full and the rest waits in the transport, in order; every byte
    arrives once, in the order sent, when the peer reads."""
    chunk, count = 4096, 4096

    async def main() -> tuple[bytes, bytes, int, int]:
        transport, peer = await _accepted()
        fd = module._direct_fd(transport)
        assert fd >= 0
        direct = buffered_at = 0
        queued = False  # as the session keeps it: asks the transport only after using it
        sent = []
        try:
            for i in range(count):
                data = i.to_bytes(4, "big") * (chunk // 4)
                if not transport.get_write_buffer_size():
                    direct += 1
                elif not buffered_at:
                    buffered_at = i
                queued = module._send(fd, data,
                                      transport.get_write_buffer_size if queued else None,
                                      transport.write)
                sent.append(data)
            got = bytearray()
            loop = asyncio.get_running_loop()
            peer.setblocking(False)
            want = chunk * count
            while len(got) < want:  # the loop runs meanwhile: the transport writes its buffer
                got += await loop.sock_recv(peer, 1 << 20)
            transport.close()
        finally:
            module._close_fd(fd)
            peer.close()
        return bytes(got), b"".join(sent), direct, buffered_at

    got, sent, direct, buffered_at = _run(main)
    assert direct >= 1 and buffered_at >= 1  # both ways were taken
    assert len(got) == len(sent)
    assert got == sent


def test_a_closed_session_descriptor_is_not_used(module: ModuleType) -> None:
    """fd -1 (not direct, or the session closed it): all of it goes to the transport."""
    written: list[bytes] = []
    assert module._send(-1, b"abc", None, written.append)
    assert written == [b"abc"]


@pytest.mark.parametrize("send_some", [installed_io.send_some, PURE_IO.send_some],
                         ids=["installed", "pure"])
def test_send_some_reports_what_the_socket_took(send_some: Callable[[int, bytes], int]) -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        assert send_some(a.fileno(), b"hello") == 5
        assert b.recv(16) == b"hello"
        total = 0
        while (n := send_some(a.fileno(), b"x" * 65536)) > 0:  # until the socket is full
            total += n
        assert n == -1 and total > 0
        b.close()
        assert send_some(a.fileno(), b"y") == -1  # the peer is gone: an error, no SIGPIPE
    finally:
        a.close()
        b.close()


def test_tls_and_other_transports_are_never_written_directly(
        module: ModuleType, certs: tuple[Path, Path]) -> None:
    """A TLS transport's socket carries TLS records: the session never sends to it itself."""
    crt, key = certs
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)

    async def main() -> tuple[int, int]:
        plain, plain_peer = await _accepted()
        tls, tls_peer = await _accepted(ctx)
        try:
            fds = module._direct_fd(plain), module._direct_fd(tls)
            for fd in fds:
                module._close_fd(fd)
            return fds
        finally:
            plain.close()
            tls.close()
            plain_peer.close()
            tls_peer.close()

    plain_fd, tls_fd = _run(main)
    assert plain_fd >= 0
    assert tls_fd == -1
    assert module._direct_fd(object()) == -1  # not a socket transport at all


def test_a_reused_tracked_statement_starts_afresh() -> None:
    """_track(t, ...) with the session's last reported _Tracked (Session._spare) gives that
    object back with every field set anew: nothing of the statement before (rows, error,
    duration, template, encoding reset) carries over to the next one's audit event."""
    from pgguard.classify import PiiRules, classify

    first, second = classify("select 1", PiiRules()), classify("select 2", PiiRules())
    t = installed._track(None, 1, first, "released", "r1", 7)
    t.rows, t.error, t.resets_encoding, t.family, t.ended = 5, "42P01", True, (b"x",), 3.0
    t.started = 0.25
    again = installed._track(t, 2, second, "allowed", "r2", None)
    assert again is t
    assert (t.kind, t.classification, t.decision, t.rule, t.stepup_event) == (
        2, second, "allowed", "r2", None)
    assert (t.rows, t.error, t.resets_encoding, t.family, t.ended) == (None, None, False, None, -1.0)
    assert t.started > 0.25  # now, on the monotonic clock
    assert installed._track(None, 1, first, "allowed", None, None) is not t
