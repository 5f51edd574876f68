"""free_port(): ports for servers a test or the demo starts right after asking."""

from __future__ import annotations

import socket

from pgguard import localpg


def test_free_port_lies_outside_the_ephemeral_range_and_is_bindable():
    low, high = localpg._ephemeral_range()
    ports = [localpg.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)  # never handed out twice
    for port in ports:
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_in_use(monkeypatch):
    busy, other = localpg.free_port(), localpg.free_port()
    localpg._handed_out.difference_update({busy, other})
    picks = iter([busy, other])
    monkeypatch.setattr(localpg.random, "randint", lambda a, b: next(picks))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", busy))
        assert localpg.free_port() == other


def test_free_port_falls_back_to_the_kernel_when_the_range_is_everything(tmp_path, monkeypatch):
    whole = tmp_path / "range"
    whole.write_text("1024\t65535\n")
    monkeypatch.setattr(localpg, "_EPHEMERAL_RANGE_FILE", whole)
    port = localpg.free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
