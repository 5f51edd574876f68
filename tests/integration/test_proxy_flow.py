"""How a session follows its two sockets: flow control when the client stops reading, and the
end of either side's connection (cleanly, by a reset, by a reset behind unread bytes). Real
PostgreSQL, real `pgguard run` subprocess, raw sockets."""

from __future__ import annotations

import signal
import socket
import struct
import time
from pathlib import Path

import psycopg
import pytest

from pgguard.protocol import messages as m
from tests.integration.test_proxy_core import connect_raw, md5_login, read_messages

pytestmark = pytest.mark.timeout(120)

ROWS, WIDTH = 100_000, 1000  # a 100 MB result


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _backend_pid(sock: socket.socket) -> int:
    sock.sendall(m.query("SELECT pg_backend_pid()"))
    rows = [body for typ, body in read_messages(sock) if typ == "D"]
    (count, length), value = struct.unpack("!hi", rows[0][:6]), rows[0][6:]
    assert count == 1 and length == len(value)
    return int(value)


def _backend_gone(pg, pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        while time.monotonic() < deadline:
            if not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchall():
                return True
            time.sleep(0.05)
    return False


def test_a_client_that_stops_reading_gets_every_row_later(pg, proxy) -> None:
    """The client sends a query with a 100 MB result and reads nothing for two seconds. pgguard
    stops reading the server while the client's side is full (its memory stays far below the
    result's size), and then the client gets every row, in order."""
    assert proxy.proc is not None
    with connect_raw(proxy) as s:
        md5_login(s)
        before = _rss_bytes(proxy.proc.pid)
        s.sendall(m.query(f"SELECT g, repeat('x', {WIDTH}) FROM generate_series(1, {ROWS}) g"))
        time.sleep(2)
        grown = _rss_bytes(proxy.proc.pid) - before
        msgs = read_messages(s, timeout=60)
    assert grown < 20 * 1024 * 1024, f"pgguard buffered {grown} bytes for a client not reading"
    rows = [body for typ, body in msgs if typ == "D"]
    assert len(rows) == ROWS
    firsts = [int(body[6:6 + struct.unpack("!i", body[2:6])[0]]) for body in rows]
    assert firsts == list(range(1, ROWS + 1))
    assert all(body.endswith(b"x" * WIDTH) for body in rows)
    assert [typ for typ, _ in msgs[-2:]] == ["C", "Z"]


def test_a_client_reset_ends_its_backend(pg, proxy) -> None:
    """A client whose connection ends with a reset (RST): pgguard ends the session, and the
    server's backend goes."""
    s = connect_raw(proxy)
    md5_login(s)
    pid = _backend_pid(s)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # SO_LINGER 0: close sends RST
    assert _backend_gone(pg, pid)


def test_a_client_that_closes_without_terminate_ends_its_backend(pg, proxy) -> None:
    """A client that ends its stream without Terminate (shutdown): pgguard ends the session, the
    server's backend goes, and the client's side is closed too."""
    with connect_raw(proxy) as s:
        md5_login(s)
        pid = _backend_pid(s)
        s.shutdown(socket.SHUT_WR)
        assert _backend_gone(pg, pid)
        s.settimeout(10)
        assert s.recv(1) == b""


def test_a_server_that_goes_away_ends_the_client_connection(pg, proxy) -> None:
    """The server ends the backend (pg_terminate_backend): its FATAL reaches the client once,
    then the end of the stream."""
    with connect_raw(proxy) as s:
        md5_login(s)
        pid = _backend_pid(s)
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        msgs = read_messages(s, until=b"", timeout=10)  # to the end of the stream
    fatal = [body for typ, body in msgs if typ == "E"]
    assert len(fatal) == 1 and b"57P01" in fatal[0]


def test_a_reset_behind_unread_bytes_ends_the_session(pg, proxy) -> None:
    """pgguard sees bytes and the reset behind them at once (it is stopped while they arrive):
    it reads the bytes (here half a message, which nothing answers), then meets the reset and
    ends the session; the server's backend goes. A reader that stopped after the bytes would
    leave the session, and the backend, there for good."""
    assert proxy.proc is not None
    s = connect_raw(proxy)
    md5_login(s)
    pid = _backend_pid(s)
    whole = m.query("SELECT 1")
    proxy.signal(signal.SIGSTOP)
    try:
        s.sendall(whole[:len(whole) // 2])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST, behind the half message
        time.sleep(0.2)
    finally:
        proxy.signal(signal.SIGCONT)
    assert _backend_gone(pg, pid)
