"""The compiled hot path (setup.py: Cython) against its Python source, the reference.

The audit sink's statement events (audit.py with audit.pxd) are checked the same way: the same
events chained by the compiled sink and by the one loaded from audit.py give the same bytes.
The usual statement line is made by a C helper (_auditline.pyx) when it is built: its lines
and hashes must be the ones audit.py's own code makes, for any values.

framing.py is compiled with C types (framing.pxd); here the compiled Framer and the one loaded
from framing.py as plain Python get the same random streams, splits and verdicts (forward,
replace, hold then resume) and must give the same bytes, callbacks, errors and states.
On CI (CI=true) the compiled modules must exist: a build that silently fell back to pure
Python would fail here, not go unnoticed.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgguard.observability._usual as compiled_usual
import pgguard.observability.audit as compiled_audit
import pgguard.observability.tally as compiled_tally
import pgguard.protocol.framing as compiled_framing
import pgguard.proxy._clock as compiled_clock
import pgguard.proxy.session as session_module
from pgguard.classify import PiiRules, classify
from pgguard.errors import ProtocolError
from pgguard.proxy.session import CLIENT_TABLE, SERVER_READY_TABLE, SERVER_TABLE
from tests.pure import pure


def _is_compiled(module: ModuleType) -> bool:
    return not str(module.__file__).endswith(".py")


PURE = pure(compiled_framing)
PURE_AUDIT = pure(compiled_audit)
PURE_TALLY = pure(compiled_tally)
PURE_USUAL = pure(compiled_usual)


@pytest.fixture(autouse=True)
def _compiled_build() -> None:
    missing = [mod.__name__ for mod in (compiled_framing, session_module, compiled_audit,
                                        compiled_tally, compiled_clock, compiled_usual)
               if not _is_compiled(mod)]
    if compiled_audit._CStatementLines is None:
        missing.append("pgguard.observability._auditline")
    if missing and os.environ.get("CI"):
        pytest.fail(f"not compiled: {', '.join(missing)} (setup.py needs Cython, a C compiler "
                    "and, for the audit line, OpenSSL's headers)")
    if missing:
        pytest.skip(f"pure Python install: {', '.join(missing)} not compiled")


def test_c_clock_is_time_monotonic() -> None:
    """The session's C clock (_clock.pyx) reads the clock time.monotonic() reads: a reading
    taken between two of time.monotonic() lies between them."""
    import time

    for _ in range(1000):
        before = time.monotonic()
        reading = compiled_clock.monotonic()
        after = time.monotonic()
        assert before <= reading <= after


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
    sinks[1]._lines = None  # audit.py's own code throughout, not the C helper
    for session, user, addr, ci, decision, rule, duration, rows, error, stepup, ts in events:
        args = (session, user, addr, _CLASSIFICATIONS[ci], decision, rule, duration, rows,
                error, stepup)
        got, want = (sink._chain_statement(ts, args) for sink in sinks)
        assert got == want
    assert (sinks[0].last_id, sinks[0].last_hash) == (sinks[1].last_id, sinks[1].last_hash)


# -- the usual statement line in C (_auditline.pyx) against audit.py's code --------------------

_HEXES = st.text("0123456789abcdef", min_size=64, max_size=64)
# Durations as whole microseconds (every repr form: 0.0, 5e-06, 1.2e-05, 0.0001, 123.456789,
# at the 1e15 µs limit and past it) and as any float, half-microsecond ties included.
_DURATIONS = (st.integers(0, 10**15 + 10).map(lambda us: us / 1e6)
              | st.integers(0, 200).map(lambda us: us / 1e6)
              | st.sampled_from([0.0, 5e-7, 1.5e-6, 2.5e-6, 9.95e-5, 0.0001, 1e9, 1e9 - 1e-6])
              | st.floats(-1, 2e9, allow_nan=False, allow_infinity=False))
_TIMES = (st.floats(0, 253402300800, allow_nan=False)
          | st.sampled_from([0.0, 1e9 + 0.5e-6, 1e9 + 1.5e-6, 253402300799.999999, -1.0]))
_ROWS = st.integers(0, (1 << 63) - 1) | st.integers(-5, (1 << 64) + 5) | st.just(True)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=14), st.text(max_size=10), st.text(max_size=20),
       st.integers(0, len(_SQL) - 1), st.none() | st.text(max_size=8), _DURATIONS, _ROWS,
       _TIMES, st.integers(0, (1 << 63) - 2) | st.integers(1 << 63, 1 << 64), _HEXES)
def test_c_statement_line_is_what_audit_py_writes(session: str, user: str, addr: str, ci: int,
                                                  rule: str | None, duration: float, rows: int,
                                                  ts: float, last_id: int, prev: str) -> None:
    """Same line, hash and id from the C helper as from audit.py's code; and the helper
    declines (None: audit.py writes the line) only outside the ranges it writes."""
    sinks = [compiled_audit.AuditSink(compiled_audit.AuditConfig(path=None)) for _ in range(2)]
    sinks[1]._lines = None
    args = (session, user, addr, _CLASSIFICATIONS[ci], "allowed", rule, duration, rows, None,
            None)
    for sink in sinks:
        sink._last_id, sink._last_hash = last_id, prev
    got, want = (sink._chain_statement(ts, args) for sink in sinks)
    assert got == want
    assert (sinks[0].last_id, sinks[0].last_hash) == (sinks[1].last_id, sinks[1].last_hash)
    assert sinks[0].last_hash == want[-67:-3].decode()
    parts = sinks[0]._templates.get(sinks[0], _CLASSIFICATIONS[ci], session, user, addr,
                                    "allowed", rule, True, False, False)
    made = compiled_audit._CStatementLines().line(parts, duration, last_id + 1, prev, rows, ts)
    in_range = (type(rows) is int and 0 <= rows < 1 << 63 and last_id + 1 < 1 << 63
                and 0 <= round(duration * 1e6) < 10**15 and 0 <= round(ts * 1e6) < 253402300800e6)
    assert (made is not None) == in_range
    if made is not None:
        assert made == want
    assert compiled_audit._CStatementLines().line(parts, float("nan"), 1, prev, 1, ts) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_SQL) - 1), _DURATIONS, _ROWS, _TIMES),
                min_size=1, max_size=12),
       st.integers(0, 3), st.integers(0, (1 << 63) - 20) | st.integers((1 << 63) - 8, 1 << 64),
       _HEXES)
def test_c_statement_block_is_the_lines_chained_one_by_one(
        events: list[tuple[int, float, int, float]], start: int, first_id: int,
        prev: str) -> None:
    """block() (the writer thread's batch, made without the GIL) writes the deferred events
    (a UsualEvents: those whose row count it took) from number `start` on as line() would,
    each chained after the one before, and stops at the first event line() declines;
    `digest` is then the last line's hash."""
    sink = compiled_audit.AuditSink(compiled_audit.AuditConfig(path=None))
    queue = compiled_usual.UsualEvents()
    queued = []
    for ci, duration, rows, ts in events:
        parts = sink._templates.get(sink, _CLASSIFICATIONS[ci], "abcdefghijkl", "alice",
                                    "10.0.0.7", "allowed", "oncall", True, False, False)
        took = queue.add(parts, duration, rows, ts)
        assert took == (type(rows) is int and 0 <= rows < 1 << 63)
        if took:
            queued.append((parts, duration, rows, ts))
    assert len(queue) == len(queued)
    assert [queue.event(i) for i in range(len(queue))] == queued
    one = compiled_audit._CStatementLines()
    want: list[bytes] = []
    head = prev
    for parts, duration, rows, ts in queued[start:]:
        line = one.line(parts, duration, first_id + len(want), head, rows, ts)
        if line is None:
            break
        want.append(line)
        head = one.digest
    block = compiled_audit._CStatementLines()
    data, count = block.block(queue, start, first_id, prev)
    assert (data, count) == (b"".join(want), len(want))
    if want:
        assert block.digest == head
    # The Python UsualEvents (_usual.py) takes the same events; block() leaves it to audit.py.
    pure = PURE_USUAL.UsualEvents()
    assert [pure.add(*event) for event in queued] == [True] * len(queued)
    assert [pure.event(i) for i in range(len(pure))] == queued
    assert block.block(pure, start, first_id, prev) == (b"", 0)


@given(st.lists(st.tuples(st.booleans(), _ROWS), max_size=40), st.integers(0, 3))
def test_usual_events_compiled_and_python_take_the_same(ops: list[tuple[bool, int]],
                                                        every: int) -> None:
    """UsualEvents (_usual.pyx) against its source (_usual.py): the same events added and
    refused, taken whole and in order (what was in the taker before is dropped), cleared."""
    parts = (b"a", b"b", b"c", b"d", b"e", b"f}")
    queues = [(module.UsualEvents(), module.UsualEvents()) for module in (compiled_usual,
                                                                         PURE_USUAL)]
    seen: list[list[Any]] = [[], []]
    for k, (take, rows) in enumerate(ops):
        for (q, into), trace in zip(queues, seen, strict=True):
            trace.append(q.add(parts, k / 7, rows, 1e9 + k))
            if take or (every and k % every == 0):
                q.take(into)
                trace.append([into.event(i) for i in range(len(into))])
                trace.append([into.ts(i) for i in range(len(into))])
                if k % 2:
                    into.clear()
                trace.append((len(q), len(into)))
    assert seen[0] == seen[1]
    for module in (compiled_usual, PURE_USUAL):
        q = module.UsualEvents()
        assert not q.add(None, 0.0, 1, 0.0)
        with pytest.raises(TypeError):
            q.add([b"a"], 0.0, 1, 0.0)
        assert q.add(parts, 0.5, 1, 2.0)
        q.take(q)  # no change
        assert len(q) == 1 and q.event(0) == (parts, 0.5, 1, 2.0)
        for i in (-1, 1):
            with pytest.raises(IndexError):
                q.event(i)
            with pytest.raises(IndexError):
                q.ts(i)
        with pytest.raises(TypeError):
            q.take(None)


def test_python_sink_and_events_write_the_deferred_events_in_order(tmp_path: Path) -> None:
    """audit.py and _usual.py as plain Python (an install without a compiler): usual events
    from several threads, and other events between them, are all written once, in the order
    of emission, and the chain verifies."""
    import threading

    from pgguard.observability.audit_files import verify_files

    path = tmp_path / "audit.jsonl"
    sink = PURE_AUDIT.AuditSink(PURE_AUDIT.AuditConfig(path=path))
    sink._usual, sink._usual_batch = PURE_USUAL.UsualEvents(), PURE_USUAL.UsualEvents()
    sink._lines = None
    sink.start()
    parts = sink.usual_template("abcdefghijkl", "alice", "x", _CLASSIFICATIONS[0], "allowed",
                                "oncall")
    assert parts is not None

    def emitter(k: int) -> None:
        for i in range(500):
            sink.emit_usual(parts, 0.001, k * 100_000 + i)
            if i % 100 == 0:
                sink.emit("session.start", session=f"s{k:011d}", user="bob", client_addr="x")
        sink.emit_usual(parts, 0.001, 1 << 70)  # past a C long long: chained at once

    threads = [threading.Thread(target=emitter, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.flush_sync()
    sink.close_sync()
    events = [json.loads(line) for line in path.read_bytes().splitlines()]
    rows = [e["rows"] for e in events if e["event"] == "statement"]
    assert sorted(rows) == sorted([k * 100_000 + i for k in range(3) for i in range(500)]
                                  + [1 << 70] * 3)
    for k in range(3):
        mine = [r for r in rows if r // 100_000 == k]
        assert mine == sorted(mine)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert verify_files([path]).ok


def test_c_append_writes_only_to_the_file_it_left(tmp_path: Path) -> None:
    """append() (the writer's batch, one C call without the GIL) appends when the file is still
    the one at the path and still as long as the writer left it; else it writes nothing and
    says -1 (the writer then re-reads the chain). A failed write raises OSError."""
    from pgguard.observability._auditline import append

    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"one\n")
    with open(path, "ab") as f:
        fd, name = f.fileno(), os.fsencode(path)
        assert append(fd, name, b"two\n", 4, False) == 8
        assert append(fd, name, b"three\n", 8, True) == 14
        assert append(fd, name, b"stale\n", 8, False) == -1  # another writer appended
        path.rename(tmp_path / "rotated.jsonl")
        path.write_bytes(b"")
        assert append(fd, name, b"moved\n", 14, False) == -1  # rotated away
        assert append(fd, os.fsencode(tmp_path / "rotated.jsonl"), b"four\n", 14, False) == 19
    assert (tmp_path / "rotated.jsonl").read_bytes() == b"one\ntwo\nthree\nfour\n"
    assert path.read_bytes() == b""
    full = tmp_path / "full"
    full.symlink_to("/dev/full")
    with open(full, "ab") as f, pytest.raises(OSError) as raised:
        append(f.fileno(), os.fsencode(full), b"x\n", os.fstat(f.fileno()).st_size, False)
    assert raised.value.errno == errno.ENOSPC

# -- the per-statement histogram (tally.py compiled with tally.pxd) -----------------------------

_BOUNDS = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20)
_AMOUNTS = st.lists(st.floats(-2e3, 2e3, allow_nan=False)
                    | st.sampled_from([0.0, 5e-4, 1e-3, 300.0, 600.0]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_BOUNDS, _AMOUNTS)
def test_compiled_histogram_counts_what_its_source_counts(bounds: list[float],
                                                          amounts: list[float]) -> None:
    """Same buckets and sum, compiled or not; an amount equal to a bound counts in it (le)."""
    hists = [module.TallyHistogram(bounds) for module in (compiled_tally, PURE_TALLY)]
    for amount in amounts:
        for h in hists:
            h.observe(amount)
    assert hists[0].counts == hists[1].counts
    assert hists[0].sum == hists[1].sum
    assert hists[0].buckets() == hists[1].buckets()
    edges = sorted(bounds)
    assert hists[0].counts[:-1] == [
        sum(1 for a in amounts if a <= b and not any(a <= c for c in edges[:i]))
        for i, b in enumerate(edges)]
