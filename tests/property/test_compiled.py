"""The compiled hot path (setup.py: Cython) against its Python source, the reference.

The audit sink's statement events (audit.py with audit.pxd) are checked the same way: the same
events chained by the compiled sink and by the one loaded from audit.py give the same bytes.

framing.py is compiled with C types (framing.pxd); here the compiled Framer and the one loaded
from framing.py as plain Python get the same random streams, splits and verdicts (forward,
replace, hold then resume) and must give the same bytes, callbacks, errors and states.
On CI (CI=true) the compiled modules must exist: a build that silently fell back to pure
Python would fail here, not go unnoticed.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgguard.observability.audit as compiled_audit
import pgguard.protocol.framing as compiled_framing
import pgguard.proxy.session as session_module
from pgguard.classify import PiiRules, classify
from pgguard.errors import ProtocolError
from pgguard.proxy.session import CLIENT_TABLE, SERVER_READY_TABLE, SERVER_TABLE


def _is_compiled(module: ModuleType) -> bool:
    return not str(module.__file__).endswith(".py")


def _pure(module: ModuleType) -> ModuleType:
    """`module` loaded from its .py source as plain Python, under another name."""
    source = Path(str(module.__file__)).with_name(module.__name__.rpartition(".")[2] + ".py")
    spec = importlib.util.spec_from_file_location(f"pgguard_pure_{source.stem}", source)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up there
    spec.loader.exec_module(loaded)
    return loaded


PURE = _pure(compiled_framing)
PURE_AUDIT = _pure(compiled_audit)


@pytest.fixture(autouse=True)
def _compiled_build() -> None:
    missing = [mod.__name__ for mod in (compiled_framing, session_module, compiled_audit)
               if not _is_compiled(mod)]
    if missing and os.environ.get("CI"):
        pytest.fail(f"not compiled: {', '.join(missing)} (setup.py needs Cython and a C compiler)")
    if missing:
        pytest.skip(f"pure Python install: {', '.join(missing)} not compiled")


def msg(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + struct.pack("!i", len(body) + 4) + body


frames = st.builds(msg, st.sampled_from(list(b"QPBEDCSHXFcfdp2ZTnNA1s")),
                   st.binary(max_size=80))
garbage = st.binary(min_size=1, max_size=12)
streams = st.lists(st.one_of(frames, frames, frames, garbage), max_size=14)
verdicts = st.lists(st.sampled_from(["forward", "replace", "hold"]), min_size=1, max_size=20)


def drive(module: ModuleType, table: bytes, chunks: list[bytes], plan: list[str],
          head_bytes: int, max_len: int) -> list[Any]:
    """Everything observable of one run: per-feed output, callbacks, holds, error, state."""
    trace: list[Any] = []
    step = iter(plan * 50)

    def on_frame(typ: int, buf: bytes, start: int, end: int) -> Any:
        trace.append(("frame", typ, bytes(buf[start:end])))
        choice = next(step)
        if choice == "replace":
            return b"R" + bytes([typ])
        if choice == "hold":
            return module.HOLD
        return module.FORWARD

    framer = module.Framer(table, on_frame, head_bytes=head_bytes, max_len=max_len)
    try:
        for chunk in chunks:
            trace.append(("out", framer.feed(chunk)))
            while framer.holding:
                trace.append(("backlog", framer.backlog_size))
                choice = next(step)
                trace.append(("resume", framer.resume(None if choice != "replace" else b"X")))
            trace.append(("idle", framer.idle))
            framer.run_later()  # LATER messages (SERVER_READY_TABLE): called back now
            trace.append(("later done", framer.idle))
    except ProtocolError as exc:
        trace.append(("error", type(exc).__name__, str(exc)))
    return trace


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams, st.lists(st.integers(0, 400), max_size=10), verdicts,
       st.sampled_from([5, 16, 4096]), st.sampled_from([64, 1 << 20]),
       st.sampled_from(["client", "server", "server ready"]))
def test_compiled_framer_behaves_as_its_source(parts: list[bytes], cuts: list[int],
                                               plan: list[str], head_bytes: int, max_len: int,
                                               side: str) -> None:
    data = b"".join(parts)
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    table = {"client": CLIENT_TABLE, "server": SERVER_TABLE, "server ready": SERVER_READY_TABLE}[side]
    want = drive(PURE, table, chunks, plan, head_bytes, max_len)
    got = drive(compiled_framing, table, chunks, plan, head_bytes, max_len)
    assert got == want


# -- the audit trail's statement events (audit.py compiled with audit.pxd) ------------------------

_SQL = ["SELECT abalance FROM pgbench_accounts WHERE aid = $1", "delete from users where id = 1",
        "select 'ünïcödé \"quoted\" \\\\ back' as x", "selec broken"]
_CLASSIFICATIONS = [classify(sql, PiiRules()) for sql in _SQL]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.text(max_size=14), st.text(max_size=10), st.text(max_size=20),
    st.integers(0, len(_SQL) - 1), st.sampled_from(["allowed", "released"]),
    st.none() | st.text(max_size=8), st.floats(0, 1e4, allow_nan=False),
    st.none() | st.integers(0, 1 << 62), st.none() | st.text(max_size=6),
    st.none() | st.integers(0, 1 << 40), st.floats(0, 4e9, allow_nan=False)),
    min_size=1, max_size=6))
def test_compiled_audit_chains_what_its_source_chains(events: list[tuple[Any, ...]]) -> None:
    """The same statement events give the same lines, hashes and ids, compiled or not."""
    sinks = [module.AuditSink(module.AuditConfig(path=None)) for module in (compiled_audit,
                                                                            PURE_AUDIT)]
    for session, user, addr, ci, decision, rule, duration, rows, error, stepup, ts in events:
        args = (session, user, addr, _CLASSIFICATIONS[ci], decision, rule, duration, rows,
                error, stepup)
        got, want = (sink._chain_statement(ts, args) for sink in sinks)
        assert got == want
    assert (sinks[0].last_id, sinks[0].last_hash) == (sinks[1].last_id, sinks[1].last_hash)
