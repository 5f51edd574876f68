"""The audit sink: hash chain, canonical JSON, verification, rotation, restart, fail-closed health,
redaction (DESIGN §7). Real files in tmp_path; the writer thread is the real one."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgguard.classify import PiiRules, classify
from pgguard.observability import audit as A
from pgguard.observability.audit import GENESIS, AuditConfig, AuditError, AuditSink, rotated_files
from pgguard.observability.audit_files import format_event, matches, tail, verify_files

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
RULES = PiiRules.from_config({"tables": {"public.users": ["email", "ssn"]}})


def sink_at(path: Path, **kw) -> AuditSink:
    s = AuditSink(AuditConfig(path=path, **kw))
    s.start()
    return s


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def events(path: Path) -> list[dict]:
    return [json.loads(x) for x in lines(path)]


def write_some(path: Path, n: int = 5, **kw) -> list[dict]:
    s = sink_at(path, **kw)
    for i in range(n):
        s.emit(A.SESSION_START, session=f"s{i:011d}", user="alice", client_addr="10.0.0.7:5000")
    assert s.flush_sync()
    s.close_sync()
    return events(path)


def test_chain_and_canonical_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    evs = write_some(path, 4)
    assert [e["id"] for e in evs] == [1, 2, 3, 4]
    assert evs[0]["prev"] == GENESIS == "0" * 64
    for before, e in zip([None, *evs], evs, strict=False):
        assert TS.match(e["ts"]), e["ts"]
        assert e["event"] == "session.start" and e["user"] == "alice"
        assert e["client_addr"] == "10.0.0.7:5000"
        # Recompute independently of the module: sort_keys, (',', ':'), UTF-8.
        body = {k: v for k, v in e.items() if k != "hash"}
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False).encode("utf-8")
        assert e["hash"] == hashlib.sha256(canon).hexdigest()
        if before is not None:
            assert e["prev"] == before["hash"]


def test_canonical_json_is_utf8_not_escaped() -> None:
    assert A.canonical_json({"b": "é", "a": [1, 2]}) == '{"a":[1,2],"b":"é"}'.encode()
    e = {"id": 1, "event": "x", "prev": GENESIS, "hash": "ignored"}
    assert A.chain_hash(e) == hashlib.sha256(
        b'{"event":"x","id":1,"prev":"' + GENESIS.encode() + b'"}').hexdigest()


def test_verify_ok_and_each_kind_of_tampering(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_some(path, 6)
    assert verify_files([path]).message() == "ok 6 events"
    original = lines(path)

    def tampered(new: list[bytes]) -> str:
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(b"".join(new))
        r = verify_files([bad])
        assert not r.ok
        return str(r.error)

    edited = json.loads(original[2])
    edited["user"] = "mallory"  # hash left as it was
    err = tampered([*original[:2], (json.dumps(edited) + "\n").encode(), *original[3:]])
    assert err.startswith(f"{tmp_path / 'bad.jsonl'}:3: hash does not match")
    # A removed line: the next one's prev no longer matches.
    assert ":3: prev does not match" in tampered([*original[:2], *original[3:]])
    # An inserted (copied) line.
    assert ":4: prev does not match" in tampered([*original[:3], original[1], *original[3:]])
    # Two lines swapped.
    assert ":3: prev does not match" in tampered(
        [*original[:2], original[3], original[2], *original[4:]])
    # A forged line whose hash is right but whose chain is not: caught on the next line.
    forged = json.loads(original[3])
    forged["user"] = "mallory"
    forged["hash"] = A.chain_hash(forged)
    assert ":5: prev does not match" in tampered(
        [*original[:3], (json.dumps(forged) + "\n").encode(), *original[4:]])
    # A cut-off last line.
    assert ":6: incomplete last line" in tampered([*original[:5], original[5][:-10]])


def test_rotation_keeps_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    s = sink_at(path, rotate_bytes=800)
    for i in range(30):
        s.emit(A.STATEMENT, session="abcdefghijkl", user="bob", decision="allowed", n=i)
        if i % 3 == 0:
            assert s.flush_sync()
    assert s.flush_sync()
    s.close_sync()
    rotated = rotated_files(path)
    assert len(rotated) >= 3
    series = [*rotated, path]
    assert verify_files(series).message() == "ok 30 events"
    # Each rotated file verifies alone from its first prev, and starts with the last hash of the
    # one before.
    for before, after in itertools.pairwise(series):
        assert verify_files([after]).ok
        if after.stat().st_size:
            assert events(after)[0]["prev"] == events(before)[-1]["hash"]
    assert events(rotated[0])[0]["prev"] == GENESIS
    # Out of order, or one missing, is named.
    r = verify_files([rotated[1], rotated[0]])
    assert not r.ok and f"{rotated[0]}:1: prev does not match the last hash of" in str(r.error)
    r = verify_files([rotated[0], *rotated[2:], path])
    assert not r.ok and f"{rotated[2]}:1:" in str(r.error)


def test_restart_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_some(path, 2)
    write_some(path, 3)
    evs = events(path)
    assert [e["id"] for e in evs] == [1, 2, 3, 4, 5]
    assert verify_files([path]).message() == "ok 5 events"


def test_restart_after_rotation_and_after_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_some(path, 3, rotate_bytes=1)  # rotates after every batch: the current file is empty
    assert path.stat().st_size == 0 and rotated_files(path)
    with path.open("ab") as f:  # a crash left half a line behind
        f.write(b'{"id": 4, "ts": "2025-')
    write_some(path, 2)
    assert verify_files([*rotated_files(path), path]).message() == "ok 5 events"
    assert events(path)[0]["id"] == 4


def test_garbage_last_line_refuses_to_continue(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("this is not an audit event\n")
    with pytest.raises(AuditError, match="not JSON"):
        AuditSink(AuditConfig(path=path)).start()


def test_unwritable_path_is_unhealthy_counts_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the audit directory should be\n")
    path = blocker / "audit.jsonl"
    counted: list[int] = []
    s = AuditSink(AuditConfig(path=path, retry_interval=0.05), on_error=lambda: counted.append(1))
    s.start()
    try:
        assert not s.healthy
        assert s.errors >= 1 and len(counted) == s.errors
        s.emit(A.STATEMENT, session="abcdefghijkl", user="alice", decision="denied")
        assert not s.flush_sync()
        assert not s.healthy
        blocker.unlink()
        blocker.mkdir()
        # The writer retries every retry_interval; the held event is written then.
        assert s.flush_sync()
        assert s.healthy
        s.emit(A.SESSION_END, session="abcdefghijkl", user="alice")
        assert s.flush_sync()
    finally:
        s.close_sync()
    assert [e["event"] for e in events(path)] == ["statement", "session.end"]
    assert verify_files([path]).ok


def test_disk_full_mid_stream_then_recovery(tmp_path: Path) -> None:
    """ENOSPC on write (a symlink to /dev/full): unhealthy, nothing half-written is kept."""
    path = tmp_path / "audit.jsonl"
    write_some(path, 2)
    real = tmp_path / "real.jsonl"
    path.rename(real)
    path.symlink_to("/dev/full")
    counted: list[int] = []
    s = AuditSink(AuditConfig(path=path, retry_interval=0.05, fsync="every"),
                  on_error=lambda: counted.append(1))
    s.start()
    try:
        s.emit(A.HOLD_START, session="abcdefghijkl", user="alice", classes=["pii"])
        assert not s.flush_sync()
        assert not s.healthy and counted
        path.unlink()
        real.rename(path)
        assert s.flush_sync() and s.healthy
    finally:
        s.close_sync()
    assert verify_files([path]).message() == "ok 3 events"
    assert events(path)[-1]["event"] == "hold.start"


def test_backlog_overflow_drops_and_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "d"
    blocker.write_text("x")
    path = blocker / "audit.jsonl"
    s = AuditSink(AuditConfig(path=path, retry_interval=0.05, max_pending=3))
    s.start()
    try:
        for i in range(10):
            s.emit(A.STATEMENT, session="abcdefghijkl", decision="allowed", n=i)
        assert not s.healthy
        blocker.unlink()
        blocker.mkdir(exist_ok=True)  # the writer, retrying, may create it first
        assert s.flush_sync() and s.healthy
    finally:
        s.close_sync()
    evs = events(path)
    gap = [e for e in evs if e["event"] == A.AUDIT_GAP]
    assert gap and gap[0]["dropped"] + sum(e["event"] == "statement" for e in evs) == 10
    assert verify_files([path]).ok


def test_statement_fields_and_redaction(tmp_path: Path) -> None:
    sql = ("select id from users where email = 'alice@example.com' and ssn = '078-05-1120' "
           "and doc ?| array['k']")
    c = classify(sql, RULES)
    path = tmp_path / "audit.jsonl"
    out = io.StringIO()
    s = AuditSink(AuditConfig(path=path, stdout=True), stdout=out)
    s.start()
    s.emit(A.STATEMENT, session="abcdefghijkl", user="alice", client_addr="10.0.0.7:5000",
           classification=c, sql=sql, decision="released", rule="oncall", duration=0.0123,
           rows=1, stepup_event=7)
    with pytest.raises(ValueError, match="never written"):
        s.emit(A.STEPUP_FAILURE, session="abcdefghijkl", user="alice", code="123456")
    with pytest.raises(ValueError, match="never written"):
        s.emit(A.STATEMENT, session="abcdefghijkl", binds=["secret"])
    with pytest.raises(ValueError, match="never written"):
        s.emit(A.ENROLL, user="alice", secret="JBSWY3DPEHPK3PXP")
    assert s.flush_sync()
    s.close_sync()
    text = path.read_text()
    for secret in ("alice@example.com", "078-05-1120", "123456", "JBSWY3DPEHPK3PXP", "'k'"):
        assert secret not in text
    (e,) = events(path)
    assert e["classes"] == ["pii", "read"]
    assert e["pii_columns"] == ["public.users.email", "public.users.ssn"]
    assert e["tables"] == ["users"]
    assert e["redacted_sql"].count("<redacted>") == 3 and "?|" in e["redacted_sql"]
    assert e["fingerprint"] == c.fingerprint and "sql" not in e
    assert (e["decision"], e["rule"], e["duration"], e["rows"], e["stepup_event"]) == \
        ("released", "oncall", 0.0123, 1, 7)
    assert out.getvalue() == text  # the stdout copy is the same line

    # With include_literals the raw SQL is kept too.
    p2 = tmp_path / "literal.jsonl"
    s = sink_at(p2, include_literals=True)
    s.emit(A.STATEMENT, session="abcdefghijkl", classification=c, sql=sql, decision="allowed")
    assert s.flush_sync()
    s.close_sync()
    assert events(p2)[0]["sql"] == sql


def test_async_flush_and_close(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        s = AuditSink(AuditConfig(path=path, fsync="every"))
        s.start()
        s.emit(A.POLICY_RELOAD, result="ok", roles=frozenset({"dba", "analyst"}))
        assert await s.flush()
        await s.close()
        s.emit(A.POLICY_RELOAD, result="ok")  # after close: ignored, no error

    asyncio.run(asyncio.wait_for(scenario(), 20))
    (e,) = events(path)
    assert e["roles"] == ["analyst", "dba"] and e["result"] == "ok"


def test_emit_is_cheap() -> None:
    """emit() does no I/O: 20k events queue in well under a second even with no writer."""
    import time

    s = AuditSink(AuditConfig(path=None))
    t0 = time.perf_counter()
    for _ in range(20_000):
        s.emit(A.STATEMENT, session="abcdefghijkl", user="alice", decision="allowed")
    assert time.perf_counter() - t0 < 1.0


def test_config_from_mapping(tmp_path: Path) -> None:
    c = AuditConfig.from_mapping({"path": "audit.jsonl", "include_literals": True,
                                  "fsync": "every", "rotate_bytes": "64MiB",
                                  "fsync_interval": "250ms"}, tmp_path)
    assert c.path == tmp_path / "audit.jsonl" and c.include_literals and c.fsync == "every"
    assert c.rotate_bytes == 64 << 20 and c.fsync_interval == 0.25
    with pytest.raises(ValueError, match=r"audit\.pth"):
        AuditConfig.from_mapping({"pth": "x"})
    with pytest.raises(ValueError, match="every or interval"):
        AuditConfig.from_mapping({"fsync": "sometimes"})


def test_tail_format_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    s = sink_at(path)
    s.emit(A.SESSION_START, session="abcdefghijkl", user="alice", client_addr="10.0.0.7:5000")
    s.emit(A.STEPUP_FAILURE, session="abcdefghijkl", user="alice", reason="bad_code")
    s.emit(A.STEPUP_SUCCESS, session="mnopqrstuvwx", user="bob", classes=["pii", "write"])
    assert s.flush_sync()
    s.close_sync()
    shown: list[str] = []
    tail(path, follow=False, events=["stepup"], out=shown.append)
    assert len(shown) == 2
    assert " #2 stepup.failure alice session=abcdefghijkl reason=bad_code" in shown[0]
    assert shown[1].endswith("#3 stepup.success bob session=mnopqrstuvwx classes=pii,write")
    shown.clear()
    tail(path, follow=False, users=["alice"], last=1, out=shown.append)
    assert len(shown) == 1 and "stepup.failure" in shown[0]
    assert "hash" not in format_event(events(path)[0])
    assert matches({"event": "hold.end", "user": "a"}, ["a"], ["hold.end"])
    assert not matches({"event": "holdx.end"}, [], ["hold"])


def test_event_names_are_the_design_names() -> None:
    assert A.EVENTS >= {"session.start", "session.end", "statement", "hold.start", "hold.end",
                        "stepup.challenge", "stepup.success", "stepup.failure", "enroll",
                        "policy.reload"}
    assert set(A.HOLD_END_REASONS) == {"released", "timeout", "cancel", "disconnect",
                                       "shutdown"}
    assert set(A.STEPUP_FAILURE_REASONS) == {"bad_code", "replay", "locked",
                                             "unknown_session", "not_enrolled"}
    assert os.sep not in A.GENESIS


def test_config_from_validated_settings(tmp_path: Path) -> None:
    from pgguard import config as cfg

    settings = cfg.AuditConfig(path=str(tmp_path / "a.jsonl"), include_literals=True,
                               fsync="every", rotate_bytes=None, stdout=True)
    c = AuditConfig.from_settings(settings)
    assert c == AuditConfig(path=tmp_path / "a.jsonl", include_literals=True, fsync="every",
                            stdout=True)
    assert AuditConfig.from_settings(cfg.AuditConfig(rotate_bytes=1024)).rotate_bytes == 1024


# -- the statement fast path (emit_statement) ---------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FAST_SQL = [
    "select id from users where email = 'a@b.c'",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "delete from users where id = 1",
    "selec broken",
    "select 'ünïcödé \"quoted\" \\\\ back' as x",
    "",
]
_FAST_CLASSIFICATIONS = [classify(sql, RULES) for sql in _FAST_SQL]


@settings(max_examples=300, deadline=None)
@given(session=st.text(max_size=14), user=st.text(max_size=10), addr=st.text(max_size=20),
       ci=st.integers(0, len(_FAST_SQL) - 1),
       decision=st.sampled_from(["allowed", "released"]),
       rule=st.none() | st.text(max_size=8),
       duration=st.floats(0, 1e4, allow_nan=False),
       rows=st.none() | st.integers(0, 1 << 62),
       error=st.none() | st.text(max_size=6),
       stepup=st.none() | st.integers(0, 1 << 40),
       ts=st.floats(0, 4e9, allow_nan=False),
       literals=st.booleans())
def test_emit_statement_writes_what_emit_writes(session, user, addr, ci, decision, rule,
                                                duration, rows, error, stepup, ts,
                                                literals) -> None:
    """The template path gives the same bytes (and so the same hash chain) as the general one,
    whatever the values: quotes, backslashes, control characters, NUL (which falls back)."""
    c = _FAST_CLASSIFICATIONS[ci]
    general = AuditSink(AuditConfig(path=None, include_literals=literals))
    fast = AuditSink(AuditConfig(path=None, include_literals=literals))
    fields = {"session": session, "user": user, "client_addr": addr, "classification": c,
              "decision": decision, "rule": rule,
              "duration": A.statement_duration(duration)}
    for k, v in (("rows", rows), ("error", error), ("stepup_event", stepup)):
        if v is not None:
            fields[k] = v
    for _ in range(2):  # the second time from the cached template
        want = general._chain(ts, A.STATEMENT, dict(fields))
        got = fast._chain_statement(ts, (session, user, addr, c, decision, rule, duration,
                                         rows, error, stepup))
        assert got == want
    assert (fast.last_id, fast.last_hash) == (general.last_id, general.last_hash)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.tuples(
           st.text(max_size=14), st.integers(0, len(_FAST_SQL) - 1),
           st.sampled_from(["allowed", "released"]), st.none() | st.text(max_size=8),
           st.floats(0, 1e4, allow_nan=False), st.none() | st.integers(0, 1 << 62),
           st.none() | st.text(max_size=6), st.floats(0, 4e9, allow_nan=False)),
           min_size=1, max_size=5),
       head=st.integers(0, 1 << 40), head_hash=st.text("0123456789abcdef", min_size=64,
                                                       max_size=64))
def test_a_rechained_statement_line_is_the_line_chained_there(events, head, head_hash) -> None:
    """_rebase reads a waiting statement back from its line: chained again after another head,
    it is byte for byte the line chained after that head in the first place."""
    first, there = (AuditSink(AuditConfig(path=None)) for _ in range(2))
    there._last_id, there._last_hash = head, head_hash
    for session, ci, decision, rule, duration, rows, error, ts in events:
        args = (session, "alice", "10.0.0.7", _FAST_CLASSIFICATIONS[ci], decision, rule, duration,
                rows, error, None)
        line = first._chain_statement(ts, args)  # after first's head (GENESIS, then its own)
        want = there._chain_statement(ts, args)  # after the other head
        rebased = AuditSink(AuditConfig(path=None))
        rebased._last_id, rebased._last_hash = there._last_id - 1, json.loads(want)["prev"]
        assert rebased._rechain_line(line, {}) == want


def test_emit_statement_through_the_writer(tmp_path: Path) -> None:
    """Interleaved with other events, through the real writer thread; the file verifies and
    a stepup.success reference resolves to its id."""
    path = tmp_path / "audit.jsonl"
    s = sink_at(path)
    c = _FAST_CLASSIFICATIONS[0]
    ref = s.emit(A.STEPUP_SUCCESS, session="abcdefghijkl", user="alice")
    for i in range(50):
        s.emit_statement("abcdefghijkl", "alice", "10.0.0.7:5000", c, "allowed", "oncall",
                         i / 1000, rows=i, error="42P01" if i % 7 == 0 else None,
                         stepup_event=ref if i % 5 == 0 else None)
        if i % 10 == 0:
            s.emit(A.SESSION_START, session=f"s{i:011d}", user="bob", client_addr="x")
    assert s.flush_sync()
    s.close_sync()
    evs = events(path)
    assert len(evs) == 56 and [e["id"] for e in evs] == list(range(1, 57))
    stmts = [e for e in evs if e["event"] == "statement"]
    assert [e["rows"] for e in stmts] == list(range(50))
    assert stmts[5]["stepup_event"] == evs[0]["id"] and "stepup_event" not in stmts[1]
    assert stmts[7]["error"] == "42P01" and stmts[3]["duration"] == 0.003
    assert stmts[0]["pii_columns"] == ["public.users.email"]
    assert verify_files([path]).ok


@contextlib.contextmanager
def _another_process_appends(s: AuditSink, path: Path) -> Iterator[None]:
    """The trail starts with a session.start; inside the block this test holds the file's
    flock as another process (`pgguard enroll`) would, and at its end appends an `enroll`
    event chained after the file's last line, then unlocks."""
    import fcntl

    s.emit(A.SESSION_START, session="abcdefghijkl", user="alice", client_addr="x")
    assert s.flush_sync()
    with open(path, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield
        last = events(path)[-1]
        foreign = {"id": last["id"] + 1, "ts": "2026-01-01T00:00:00.000000Z",
                   "event": A.ENROLL, "user": "bob", "prev": last["hash"]}
        foreign["hash"] = A.chain_hash(foreign)
        f.write(A.canonical_json(foreign) + b"\n")
        f.flush()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def test_foreign_append_while_events_wait_rechains_them(tmp_path: Path) -> None:
    """Events are chained when emitted; if another process appends before the writer writes
    them (here: this test, holding the file's flock as `pgguard enroll` does), the writer
    chains them again after the foreign line, and references follow the new ids."""
    path = tmp_path / "audit.jsonl"
    s = sink_at(path)
    try:
        with _another_process_appends(s, path):
            ref = s.emit(A.STEPUP_SUCCESS, session="abcdefghijkl", user="alice")
            s.emit_statement("abcdefghijkl", "alice", "x", _FAST_CLASSIFICATIONS[1], "released",
                             "oncall", 0.5, rows=3, stepup_event=ref)
            s.emit_statement("abcdefghijkl", "alice", "x", _FAST_CLASSIFICATIONS[0], "allowed",
                             "oncall", 1.2e-05, rows=7)  # the usual event: deferred, chained later
            assert ref.id == 2  # chained at emit time, after the session.start
        assert s.flush_sync()
        s.emit(A.SESSION_END, session="abcdefghijkl", user="alice")
        assert s.flush_sync()
    finally:
        s.close_sync()
    evs = events(path)
    assert [e["event"] for e in evs] == ["session.start", "enroll", "stepup.success",
                                         "statement", "statement", "session.end"]
    assert [e["id"] for e in evs] == [1, 2, 3, 4, 5, 6]
    assert ref.id == 3 and evs[3]["stepup_event"] == 3 and evs[3]["rows"] == 3
    assert evs[4]["rows"] == 7 and evs[4]["duration"] == 1.2e-05 and evs[4]["prev"] == evs[3]["hash"]
    assert verify_files([path]).ok


def test_deferred_statements_keep_their_order_and_a_declined_value(tmp_path: Path) -> None:
    """Usual statement events are chained later, in blocks; any other event chains them first,
    and a value the C helper declines (a row count past 2**63) is written by audit.py in its
    place in the chain."""
    path = tmp_path / "audit.jsonl"
    s = sink_at(path)
    c = _FAST_CLASSIFICATIONS[0]
    rows = [1, 2, 1 << 70, 4, 5, 6]
    try:
        for i, n in enumerate(rows):
            s.emit_statement("abcdefghijkl", "alice", "x", c, "allowed", "oncall", 0.001,
                             rows=n)
            if i == 3:
                s.emit(A.SESSION_END, session="abcdefghijkl", user="alice")
        assert s.last_id == 7
        assert s.flush_sync()
    finally:
        s.close_sync()
    evs = events(path)
    assert [e["id"] for e in evs] == list(range(1, 8))
    assert [e.get("rows") for e in evs] == [1, 2, 1 << 70, 4, None, 5, 6]
    assert evs[4]["event"] == "session.end"
    assert verify_files([path]).ok


def test_foreign_append_rechains_a_block_of_deferred_statements(tmp_path: Path) -> None:
    """Deferred statement events chained as one block, then another process appends before
    the writer writes them: the block's lines are chained again, one by one, after it."""
    path = tmp_path / "audit.jsonl"
    s = sink_at(path)
    try:
        with _another_process_appends(s, path):
            for n in range(5):
                s.emit_statement("abcdefghijkl", "alice", "x", _FAST_CLASSIFICATIONS[0],
                                 "allowed", "oncall", 0.002, rows=n)
            assert s.last_id == 6  # chained (as blocks) after the session.start
        assert s.flush_sync()
        s.emit_statement("abcdefghijkl", "alice", "x", _FAST_CLASSIFICATIONS[0], "allowed",
                         "oncall", 0.002, rows=5)
        assert s.flush_sync()
    finally:
        s.close_sync()
    evs = events(path)
    assert [e["event"] for e in evs] == ["session.start", "enroll"] + ["statement"] * 6
    assert [e["id"] for e in evs] == list(range(1, 9))
    assert [e["rows"] for e in evs[2:]] == list(range(6))
    assert verify_files([path]).ok


def test_deferred_events_from_many_threads_are_all_chained_once(tmp_path: Path) -> None:
    """Emitters defer without a lock while the writer drains: under contention (threads
    switching every 1 µs) every event is written exactly once, and the file verifies."""
    import sys
    import threading

    path = tmp_path / "audit.jsonl"
    s = sink_at(path)
    c = _FAST_CLASSIFICATIONS[0]
    parts = s.usual_template("abcdefghijkl", "alice", "x", c, "allowed", "oncall")
    assert parts is not None

    def emitter(k: int) -> None:
        for i in range(3000):
            s.emit_usual(parts, 0.001, k * 100_000 + i)
            if i % 500 == 0:
                s.emit(A.SESSION_START, session=f"s{k:011d}", user="bob", client_addr="x")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=emitter, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert s.flush_sync()
    s.close_sync()
    evs = events(path)
    rows = sorted(e["rows"] for e in evs if e["event"] == "statement")
    assert rows == sorted(k * 100_000 + i for k in range(4) for i in range(3000))
    assert [e["id"] for e in evs] == list(range(1, len(evs) + 1))
    for k in range(4):  # each thread's events in the order it emitted them
        mine = [e["rows"] for e in evs if e["event"] == "statement" and e["rows"] // 100_000 == k]
        assert mine == sorted(mine)
    assert verify_files([path]).ok


def test_a_writer_thread_that_stops_leaves_the_sink_unhealthy(tmp_path: Path) -> None:
    """Fail closed: should the writer thread ever stop on a bug (here the C helper raises
    while it chains deferred events), the sink says it is unhealthy, so sensitive statements
    are refused instead of running with no record."""
    import time

    class Broken:
        digest = GENESIS

        def block(self, *args: object) -> tuple[bytes, int]:
            raise RuntimeError("a bug")

        def line(self, *args: object) -> bytes | None:
            raise RuntimeError("a bug")

    s = sink_at(tmp_path / "audit.jsonl")
    counted: list[int] = []
    s._on_error = lambda: counted.append(1)
    s._lines = Broken()
    parts = s.usual_template("abcdefghijkl", "alice", "x", _FAST_CLASSIFICATIONS[0], "allowed",
                             "oncall")
    assert parts is not None and s.healthy
    s.emit_usual(parts, 0.001, 1)
    deadline = time.monotonic() + 10
    while not counted and time.monotonic() < deadline:  # on_error: the writer's last word
        time.sleep(0.01)
    assert not s.healthy and "writer stopped" in (s.last_error or "")
    assert counted == [1] and s.errors == 1
    assert not s.flush_sync(timeout=1)  # nothing will write any more
    s.close_sync()


def test_a_usual_event_at_a_monotonic_reading_has_that_moment_on_the_wall_clock(
        tmp_path: Path) -> None:
    """emit_usual(..., now): the session passes the time.monotonic() reading at which the
    statement finished, and its ts is that moment on the sink's wall clock (the offset between
    the clocks, measured at most WALL_OFFSET_SECONDS before). A wall clock that is set (here
    an hour forward) shows in the ts of the events after that."""
    import time

    wall = [1_700_000_000.0]

    def clock() -> float:  # the wall clock, standing still but for the jump
        return wall[0] + (time.monotonic() - start)

    start = time.monotonic()
    path = tmp_path / "audit.jsonl"
    s = AuditSink(AuditConfig(path=path), clock=clock)
    s.start()
    parts = s.usual_template("abcdefghijkl", "alice", "x", _FAST_CLASSIFICATIONS[0], "allowed",
                             "oncall")
    assert parts is not None
    try:
        before = time.monotonic()
        s.emit_usual(parts, 0.001, 1, before)
        s.emit_usual(parts, 0.001, 2, before + 0.01)  # 10 ms later, the same offset
        wall[0] += 3600.0
        time.sleep(0.12)  # > WALL_OFFSET_SECONDS: the offset is measured again
        after = time.monotonic()
        s.emit_usual(parts, 0.001, 3, after)
        s.emit_usual(parts, 0.001, 4)  # no reading: the wall clock itself
        assert s.flush_sync()
    finally:
        s.close_sync()
    ts = [dt.datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.UTC).timestamp() for e in events(path)]
    assert ts[0] == pytest.approx(1_700_000_000.0 + before - start, abs=1e-4)
    assert ts[1] - ts[0] == pytest.approx(0.01, abs=2e-6)
    assert ts[2] == pytest.approx(1_700_003_600.0 + after - start, abs=1e-4)
    assert 0 <= ts[3] - ts[2] < 1.0
    assert verify_files([path]).ok


def test_a_noted_event_no_line_can_be_made_of_is_counted_as_dropped(tmp_path: Path) -> None:
    """Fail closed: a noted statement event whose line cannot be made (a NaN duration) is not
    lost silently. The events chained before it are kept, it and the ones after it in the
    same drain are counted as dropped, the sink is unhealthy until a write succeeds, and an
    audit.gap says how many."""
    path = tmp_path / "audit.jsonl"
    s = sink_at(path)
    c = _FAST_CLASSIFICATIONS[0]
    try:
        with s._chain_lock:  # the writer thread cannot drain meanwhile: this one does
            for duration in (0.001, 0.002, float("nan"), 0.003):
                s.emit_statement("abcdefghijkl", "alice", "x", c, "allowed", "oncall",
                                 duration, rows=1)
            with pytest.raises(ValueError):
                s._drain()
        assert not s.healthy
        s.emit(A.SESSION_END, session="abcdefghijkl", user="alice")
        assert s.flush_sync()
        assert s.healthy
    finally:
        s.close_sync()
    evs = events(path)
    assert [e["event"] for e in evs] == ["statement", "statement", "audit.gap", "session.end"]
    assert [e.get("duration") for e in evs[:2]] == [0.001, 0.002]
    assert evs[2]["dropped"] == 2
    assert verify_files([path]).ok
