"""The session's one-step prepared-statement round trip (Session._fast_request/_fast_reply)
against the framer's message-by-message way, which it must match exactly.

Each scenario is a list of exchanges (what the client sends, what the server answers). It runs
twice through a real Session wired by App as `pgguard run` wires it (policy, metrics, audit
trail to a file), with in-memory transports: once with every request and reply as one read
(the one-step path takes what it can), once fed byte by byte (it never can). Both runs must
forward the same bytes both ways, leave the same session state, count the same metrics and
write the same audit events. Compiled and plain Python.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvloop

import pgguard.proxy.session as installed
from pgguard.app import App
from pgguard.config import load_config
from pgguard.observability.audit import AuditConfig, AuditSink
from pgguard.protocol import messages as m
from tests.pure import compiled_or_pure, pure

PURE = pure(installed)


@pytest.fixture(params=["compiled", "pure"])
def module(request: pytest.FixtureRequest) -> ModuleType:
    return compiled_or_pure(request.param, installed)


# -- messages ------------------------------------------------------------------------------------

def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def bind(stmt: bytes, portal: bytes = b"") -> bytes:
    return _msg(b"B", portal + b"\0" + stmt + b"\0" + struct.pack("!hhih", 1, 1, 4, 1)
                + b"\0\0\0\x2a" + struct.pack("!hh", 1, 1))


def execute(portal: bytes = b"", limit: int = 0) -> bytes:
    return _msg(b"E", portal + b"\0" + struct.pack("!i", limit))


def describe(kind: bytes = b"P", name: bytes = b"") -> bytes:
    return _msg(b"D", kind + name + b"\0")


SYNC = _msg(b"S")
BIND_COMPLETE = _msg(b"2")
READY = _msg(b"Z", b"I")
READY_IN_TX = _msg(b"Z", b"T")


def row(value: bytes = b"\0\0\0\x05") -> bytes:
    return _msg(b"D", struct.pack("!hi", 1, len(value)) + value)


def complete(tag: bytes) -> bytes:
    return _msg(b"C", tag + b"\0")


def error(code: bytes) -> bytes:
    return _msg(b"E", b"SERROR\0C" + code + b"\0Mboom\0\0")


NOTICE = _msg(b"N", b"SNOTICE\0C00000\0Mhello\0\0")
SELECT = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
PREPARE = (m.parse(b"s1", SELECT, [23]) + SYNC, _msg(b"1") + READY)
ROUND_TRIP = (bind(b"s1") + execute() + SYNC, BIND_COMPLETE + row() + complete(b"SELECT 1") + READY)
ROW_DESCRIPTION = _msg(b"T", struct.pack("!h", 1) + b"abalance\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
# libpq (pgbench -M prepared, psycopg) describes the portal before it executes it.
LIBPQ_TRIP = (bind(b"s1") + describe() + execute() + SYNC,
              BIND_COMPLETE + ROW_DESCRIPTION + row() + complete(b"SELECT 1") + READY)


PII_PREPARE = (m.parse(b"p", b"SELECT email FROM users", []) + SYNC, _msg(b"1") + READY)
PII_TRIP = (bind(b"p") + execute() + SYNC, BIND_COMPLETE + row() + complete(b"SELECT 1") + READY)
SELECT2 = b"SELECT abalance, bid FROM pgbench_accounts WHERE aid = $1"
LIBPQ_TRIP_2 = (bind(b"s2") + describe() + execute() + SYNC,
                BIND_COMPLETE + ROW_DESCRIPTION + row() + complete(b"SELECT 1") + READY)


# -- the harness ---------------------------------------------------------------------------------

class _Capture:
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.data += chunk

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def _config(home: Path) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:9"},
        "tls": {"mode": "disable"},
        "audit": {"path": str(home / "audit.jsonl"), "fsync": "interval", "stdout": False},
        "pii": {"tables": {"public.users": ["email"]}},
        "roles": {"developer": {"users": ["app"], "allow": ["read", "tx"]}},
        "default_role": "developer",
    }


class Action:
    """A step of a scenario that is not an exchange: something done to pgguard meanwhile."""

    def __init__(self, act: Callable[[App, Any, Path], None]) -> None:
        self.act = act

    def __call__(self, app: App, session: Any, path: Path) -> None:
        self.act(app, session, path)


class Reload(Action):
    """Change the configuration file and reload it, as SIGHUP does."""

    def __init__(self, change: Callable[[dict[str, Any]], None]) -> None:
        def act(app: App, session: Any, path: Path) -> None:
            config = json.loads(path.read_text())
            change(config)
            path.write_text(json.dumps(config))
            app.reload()
        super().__init__(act)


def _audit_healthy(healthy: bool) -> Action:
    def act(app: App, session: Any, path: Path) -> None:
        app.ctx.audit_healthy = lambda: healthy  # type: ignore[method-assign]
    return Action(act)


SHUTDOWN = Action(lambda app, session, path: session.begin_shutdown())


def _allow_write(config: dict[str, Any]) -> None:
    config["roles"]["developer"]["allow"] = ["read", "tx", "write"]


def _allow_pii(config: dict[str, Any]) -> None:
    config["roles"]["developer"]["allow"] = ["read", "tx", "pii"]


def _pii_balance(config: dict[str, Any]) -> None:
    config["pii"]["tables"]["public.pgbench_accounts"] = ["abalance"]


def _no_reads(config: dict[str, Any]) -> None:
    config["roles"]["developer"]["allow"] = ["tx"]


Step = tuple[bytes, bytes] | Action


def _split(data: bytes, whole: bool) -> Iterator[bytes]:
    if whole:
        yield data
    else:
        yield from (data[i:i + 1] for i in range(len(data)))


async def _run(module: ModuleType, home: Path, exchanges: list[Step],
               whole: bool) -> dict[str, Any]:
    path = home / "pgguard.yaml"
    path.write_text(json.dumps(_config(home)))
    config = load_config(path, {"listen": "127.0.0.1:1", "upstream": "127.0.0.1:2"})
    app = App(config)
    assert config.audit.path
    app.audit = AuditSink(AuditConfig.from_settings(config.audit))
    app.audit.start()
    try:
        app._wire_observers()
        session = module.Session(app.ctx, "127.0.0.1", False)
        client, server = _Capture(), _Capture()
        session.client, session._write_client = client, client.write
        session.server, session._write_server = server, server.write
        session._client_buffered = session._server_buffered = client.get_write_buffer_size
        session.state, session.user, session.database = module.STATES["ready"], "app", "app"
        session._sframer.set_table(module.SERVER_READY_TABLE)
        app.ctx.session_ready(session)
        for step in exchanges:
            if isinstance(step, Action):
                step(app, session, path)
                continue
            request, reply = step
            for chunk in _split(request, whole):
                session.client_data(chunk)
            for chunk in _split(reply, whole):
                session.server_data(chunk)
        assert app.audit.flush_sync()
        assert session.state == module.STATES["ready"], "the session was closed"
        events = []
        for line in (home / "audit.jsonl").read_text().splitlines():
            event = json.loads(line)
            if event.get("session") == session.id:
                for key in ("id", "ts", "hash", "prev", "session", "duration"):
                    event.pop(key, None)
                events.append(event)
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in app.registry.collect() for s in family.samples
                   if s.name == "pgguard_statements_total"}
        return {
            "to_server": bytes(server.data), "to_client": bytes(client.data),
            "fifo": [(type(e).__name__, e.kind) for e in session._fifo],
            "unnamed": session._unnamed, "unnamed_running": session._unnamed_running,
            "txn_status": session.txn_status, "encoding": session._encoding,
            "stale": sorted(session._stale), "running": sorted(session._running),
            "portals": sorted(session._portals), "settle_at_z": session._settle_at_z,
            "copy_open": session._client_copy_open,
            "events": events, "metrics": metrics,
        }
    finally:
        app.audit.close_sync()


def _both(module: ModuleType, tmp_path: Path,
          exchanges: list[Step]) -> tuple[dict[str, Any], dict[str, Any]]:
    runs = []
    for whole in (True, False):
        home = tmp_path / ("whole" if whole else "bytes")
        home.mkdir()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runs.append(runner.run(_run(module, home, exchanges, whole)))
    return runs[0], runs[1]


# -- the scenarios -------------------------------------------------------------------------------

SCENARIOS: dict[str, list[Step]] = {
    "repeated prepared reads": [PREPARE] + [ROUND_TRIP] * 5,
    "libpq's round trips": [PREPARE] + [LIBPQ_TRIP] * 5,
    "libpq's round trip of a statement without rows": [
        PREPARE,
        (m.parse(b"b", b"BEGIN", []) + SYNC, _msg(b"1") + READY),
        (bind(b"b") + describe() + execute() + SYNC,
         BIND_COMPLETE + _msg(b"n") + complete(b"BEGIN") + READY_IN_TX),
        LIBPQ_TRIP,
        ROUND_TRIP,
    ],
    "a Describe of the statement, not the portal": [
        PREPARE,
        (bind(b"s1") + describe(b"S", b"s1") + execute() + SYNC,
         BIND_COMPLETE + _msg(b"t", b"\0\1\0\0\0\x17") + ROW_DESCRIPTION + row()
         + complete(b"SELECT 1") + READY),
        LIBPQ_TRIP,
    ],
    "no rows, several rows": [
        PREPARE,
        (ROUND_TRIP[0], BIND_COMPLETE + complete(b"SELECT 0") + READY),
        (ROUND_TRIP[0], BIND_COMPLETE + row() * 3 + complete(b"SELECT 3") + READY),
        ROUND_TRIP,
    ],
    "a notice among the rows": [
        PREPARE,
        (ROUND_TRIP[0], BIND_COMPLETE + row() + NOTICE + complete(b"SELECT 1") + READY),
        ROUND_TRIP,
    ],
    "the server's error": [
        PREPARE,
        (ROUND_TRIP[0], BIND_COMPLETE + error(b"57014") + READY),
        ROUND_TRIP,
    ],
    "a row limit and a suspended portal": [
        PREPARE,
        (bind(b"s1") + execute(limit=1) + SYNC,
         BIND_COMPLETE + row() + _msg(b"s") + READY_IN_TX),
        ROUND_TRIP,
    ],
    "a named portal": [
        PREPARE,
        (bind(b"s1", b"p1") + execute(b"p1") + SYNC,
         BIND_COMPLETE + row() + complete(b"SELECT 1") + READY),
        ROUND_TRIP,
    ],
    "a statement pgguard never saw (denied)": [
        PREPARE,
        (bind(b"nope") + execute() + SYNC, error(b"26000") + READY),
        ROUND_TRIP,
    ],
    "two round trips in one read": [
        PREPARE,
        (ROUND_TRIP[0] * 2, ROUND_TRIP[1] * 2),
        ROUND_TRIP,
    ],
    "a transaction around them": [
        PREPARE,
        (m.query(b"BEGIN"), complete(b"BEGIN") + READY_IN_TX),
        (ROUND_TRIP[0], BIND_COMPLETE + row() + complete(b"SELECT 1") + READY_IN_TX),
        (m.query(b"COMMIT"), complete(b"COMMIT") + READY),
        ROUND_TRIP,
    ],
    "a write the role may not run (denied)": [
        PREPARE,
        (m.parse(b"w", b"UPDATE pgbench_accounts SET abalance = 1", []) + bind(b"w")
         + execute() + SYNC, _msg(b"1") + error(b"42501") + READY),
        ROUND_TRIP,
    ],
    "a PII read the role may not run (denied), then the usual": [
        PREPARE,
        (m.parse(b"p", b"SELECT email FROM users", []) + SYNC, _msg(b"1") + READY),
        (bind(b"p") + execute() + SYNC, error(b"42501") + READY),
        ROUND_TRIP,
    ],
    "a reload makes both statements PII (denied)": [
        PREPARE,
        (m.parse(b"s2", SELECT2, [23]) + SYNC, _msg(b"1") + READY),
        ROUND_TRIP,
        LIBPQ_TRIP_2,
        Reload(_pii_balance),
        (LIBPQ_TRIP_2[0], error(b"42501") + READY),  # s2 first: classified again, refused
        (ROUND_TRIP[0], error(b"42501") + READY),  # and s1 too
        (m.query(b"SELECT 1"), ROW_DESCRIPTION + row() + complete(b"SELECT 1") + READY),
    ],
    "a reload takes reads away (denied)": [
        PREPARE,
        ROUND_TRIP,
        LIBPQ_TRIP,
        Reload(_no_reads),
        (ROUND_TRIP[0], error(b"42501") + READY),
        (LIBPQ_TRIP[0], error(b"42501") + READY),
    ],
    "the audit unwritable under a cached allow of a PII read (denied)": [
        Reload(_allow_pii),
        PREPARE,
        PII_PREPARE,
        PII_TRIP,
        PII_TRIP,
        _audit_healthy(False),
        (PII_TRIP[0], error(b"58030") + READY),  # sensitive: refused while it cannot be audited
        ROUND_TRIP,  # a read is not
        _audit_healthy(True),
        PII_TRIP,
    ],
    "two requests before their replies": [
        PREPARE,
        (ROUND_TRIP[0], b""),
        (LIBPQ_TRIP[0], ROUND_TRIP[1]),
        (b"", LIBPQ_TRIP[1]),
        ROUND_TRIP,
    ],
    "a shutdown while a statement runs": [
        PREPARE,
        ROUND_TRIP,
        (LIBPQ_TRIP[0], b""),
        SHUTDOWN,
        (b"", LIBPQ_TRIP[1]),
    ],
    "a portal suspended and continued": [
        PREPARE,
        (m.query(b"BEGIN"), complete(b"BEGIN") + READY_IN_TX),
        (bind(b"s1") + execute(limit=1) + SYNC, BIND_COMPLETE + row() + _msg(b"s") + READY_IN_TX),
        (execute(limit=1) + SYNC, row() + complete(b"SELECT 2") + READY_IN_TX),
        (m.query(b"COMMIT"), complete(b"COMMIT") + READY),
        ROUND_TRIP,
    ],
    "NoData without a Describe": [
        PREPARE,
        (ROUND_TRIP[0], BIND_COMPLETE + _msg(b"n") + complete(b"SELECT 0") + READY),
        ROUND_TRIP,
    ],
    "COPY FROM STDIN by the extended protocol, then a round trip's bytes": [
        Reload(_allow_write),
        PREPARE,
        ROUND_TRIP,
        (m.parse(b"c", b"COPY pgbench_history FROM STDIN", []) + SYNC, _msg(b"1") + READY),
        (bind(b"c") + execute() + SYNC, BIND_COMPLETE + _msg(b"G", b"\0\0\0")),
        # In copy-in mode (the server ignores Sync then): not the one-step path.
        (ROUND_TRIP[0], error(b"08P01") + READY),
        ROUND_TRIP,
    ],
    "SET client_encoding, prepared": [
        PREPARE,
        (m.parse(b"enc", b"SET client_encoding = 'LATIN1'", []) + SYNC, _msg(b"1") + READY),
        (bind(b"enc") + execute() + SYNC,
         BIND_COMPLETE + complete(b"SET")
         + _msg(b"S", b"client_encoding\0LATIN1\0") + READY),
        ROUND_TRIP,
    ],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_one_step_matches_the_framer(module: ModuleType, tmp_path: Path, name: str) -> None:
    whole, bytewise = _both(module, tmp_path, SCENARIOS[name])
    assert whole == bytewise
    # Nothing replaced or lost: each side got what the other sent (but a poison's swap).
    if "denied" not in name:
        exchanges = [step for step in SCENARIOS[name] if not isinstance(step, Action)]
        assert whole["to_server"] == b"".join(r for r, _ in exchanges)
        assert whole["to_client"] == b"".join(a for _, a in exchanges)
    assert whole["fifo"] == []


def _decisions(run: dict[str, Any]) -> list[str]:
    return [e["decision"] for e in run["events"] if e["event"] == "statement"]


def test_a_reload_reaches_every_prepared_statement(module: ModuleType, tmp_path: Path) -> None:
    """Rules that make a column PII apply to every statement prepared before the reload, at
    its next Bind, whichever statement is bound first (a bug fixed in session 11: only the
    first one bound was classified again, the others kept their old, allowed, classes)."""
    whole, bytewise = _both(module, tmp_path, SCENARIOS["a reload makes both statements PII (denied)"])
    assert whole == bytewise
    # (the SELECT 1 after them: the session is still usable)
    assert _decisions(whole) == ["allowed", "allowed", "denied", "denied", "allowed"]
    assert whole["stale"] == []


def test_a_cached_allow_of_a_sensitive_read_needs_the_audit(module: ModuleType,
                                                           tmp_path: Path) -> None:
    whole, bytewise = _both(
        module, tmp_path,
        SCENARIOS["the audit unwritable under a cached allow of a PII read (denied)"])
    assert whole == bytewise
    assert _decisions(whole) == ["allowed", "allowed", "denied", "allowed", "allowed"]


def test_a_policy_reload_ends_the_cached_allow(module: ModuleType, tmp_path: Path) -> None:
    whole, bytewise = _both(module, tmp_path, SCENARIOS["a reload takes reads away (denied)"])
    assert whole == bytewise
    assert _decisions(whole) == ["allowed", "allowed", "denied", "denied"]


def test_the_usual_round_trip_takes_one_step(tmp_path: Path) -> None:
    """The scenarios above would pass if the one-step path were never taken: count it (plain
    Python, where a method can be wrapped), and check what it recorded."""
    taken = {"request": 0, "reply": 0}
    real_request, real_reply = PURE.Session._fast_request, PURE.Session._fast_reply

    def request(self: Any, data: bytes) -> bool:
        ok = real_request(self, data)
        taken["request"] += ok
        return ok

    def reply(self: Any, data: bytes) -> bool:
        ok = real_reply(self, data)
        taken["reply"] += ok
        return ok

    PURE.Session._fast_request, PURE.Session._fast_reply = request, reply
    try:
        whole, bytewise = _both(PURE, tmp_path, SCENARIOS["repeated prepared reads"]
                                + SCENARIOS["libpq's round trips"][1:])
    finally:
        PURE.Session._fast_request, PURE.Session._fast_reply = real_request, real_reply
    # The first Execute is decided by the policy (then its verdict is cached); every reply
    # takes one step. The byte-by-byte run never does.
    assert taken == {"request": 9, "reply": 10}
    statements = [e for e in whole["events"] if e["event"] == "statement"]
    assert len(statements) == 10
    assert all(e["decision"] == "allowed" and e["rows"] == 1 for e in statements)
    assert whole["metrics"] == bytewise["metrics"]
    assert sum(whole["metrics"].values()) == 10
