"""free_port(): ports for servers a test or the demo starts right after asking."""

from __future__ import annotations

import socket

from pgguard import localpg


def test_free_port_lies_outside_the_ephemeral_range_and_is_bindable(tmp_path, monkeypatch):
    custom = tmp_path / "range"
    custom.write_text("20000\t60999\n")
    monkeypatch.setattr(localpg, "_EPHEMERAL_RANGE_FILE", custom)
    ports = [localpg.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)  # never handed out twice
    for port in ports:
        assert 10000 <= port < 20000 or port > 60999
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

    def no_pick(a: int, b: int) -> int:
        raise AssertionError("nothing outside 1024-65535 to pick from")

    monkeypatch.setattr(localpg.random, "randint", no_pick)
    ports = [localpg.free_port() for _ in range(5)]
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
