"""Framer (pgguard/protocol/framing.py): the same bytes out and the same callbacks however the
input is split; bulk forwarding of SKIP runs; streaming without gathering; INSPECT/HEAD/HOLD;
replacement; framing errors. Message layout: PostgreSQL docs §55.7 "Message Formats"."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterable

import pytest

from pgguard.errors import MessageTooLarge, ProtocolError
from pgguard.protocol import messages as m
from pgguard.protocol.framing import (
    FORWARD,
    HEAD,
    HOLD,
    INSPECT,
    INVALID,
    SKIP,
    FrameHandler,
    Framer,
    Verdict,
    frame_table,
)
from pgguard.proxy.session import CLIENT_TABLE, SERVER_TABLE

KB = 1024
MB = 1024 * KB


def msg(tag: bytes, body: bytes = b"") -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def bind(portal: bytes = b"", stmt: bytes = b"", value: bytes = b"") -> bytes:
    """Bind with one text parameter `value` and no result formats."""
    body = portal + b"\0" + stmt + b"\0" + struct.pack("!hhi", 0, 1, len(value)) + value
    return msg(b"B", body + struct.pack("!h", 0))


def data_row(size: int) -> bytes:
    return msg(b"D", struct.pack("!hi", 1, size) + b"x" * size)


Call = tuple[str, bytes]


class Recorder:
    """An `on_frame` that records (type, seen bytes) and answers from `decide`."""

    def __init__(self, decide: Callable[[str, bytes], Verdict] | None = None) -> None:
        self.calls: list[Call] = []
        self._decide = decide

    def __call__(self, typ: int, buf: bytes, start: int, end: int) -> Verdict:
        seen = bytes(buf[start:end])
        assert seen[0] == typ
        self.calls.append((chr(typ), seen))
        return self._decide(chr(typ), seen) if self._decide else FORWARD


def run(chunks: Iterable[bytes], table: bytes = CLIENT_TABLE,
        decide: Callable[[str, bytes], Verdict] | None = None,
        **kw: int) -> tuple[list[bytes], list[Call], Framer]:
    rec = Recorder(decide)
    framer = Framer(table, rec, **kw)
    out: list[bytes] = []
    for c in chunks:
        out += framer.feed(c)
    return out, rec.calls, framer


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 40))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# A client stream touching every mode of CLIENT_TABLE, with Binds shorter and longer than the head.
STREAM = b"".join([
    m.query("SELECT 1"),
    m.parse(b"s1", "SELECT $1::int", [23]),
    bind(b"", b"s1", b"42"),
    bind(b"p", b"s1", b"v" * 300),  # longer than head_bytes=64 below
    msg(b"D", b"Ss1\0"),
    m.execute(b"p", 10),
    msg(b"H"),
    m.sync(),
    msg(b"d", b"copy data" * 50),
    msg(b"c"),
    msg(b"p", b"password\0"),
    msg(b"C", b"Pp\0"),
    m.query(""),
    m.terminate(),
])


# -- split invariance --------------------------------------------------------------------------


@pytest.mark.parametrize("head_bytes", [1, 64, 4096])
def test_whole_bytewise_and_random_splits_agree(head_bytes: int) -> None:
    out, calls, f = run([STREAM], head_bytes=head_bytes)
    assert b"".join(out) == STREAM
    assert [c[0] for c in calls] == list("QPBBDEHScCQX")
    assert f.idle
    ways = [bytewise(STREAM)] + [splits(STREAM, random.Random(seed)) for seed in range(30)]
    for chunks in ways:
        out2, calls2, f2 = run(chunks, head_bytes=head_bytes)
        assert b"".join(out2) == STREAM
        assert calls2 == calls
        assert f2.idle


def test_trailing_partial_bytes_are_kept_until_complete() -> None:
    tail = m.query("SELECT 2")
    for k in range(1, len(tail)):
        out, calls, f = run([STREAM + tail[:k]])
        assert b"".join(out) == STREAM
        assert len(calls) == 12
        assert not f.idle
        out += f.feed(tail[k:])
        assert b"".join(out) == STREAM + tail
        assert f.idle


def test_trailing_partial_skip_message_streams_what_it_has() -> None:
    row = data_row(100)
    out, calls, f = run([row[:50]], table=SERVER_TABLE)
    assert out == [row[:50]] and calls == []
    assert f.feed(row[50:]) == [row[50:]]
    assert f.idle


def test_a_partial_header_is_not_a_message() -> None:
    for k in range(1, 5):
        out, calls, f = run([m.sync()[:k]])
        assert out == [] and calls == [] and not f.idle


def test_empty_feed_is_harmless() -> None:
    row = data_row(10)
    out, _, _ = run([b"", row[:7], b"", row[7:], b""], table=SERVER_TABLE)
    assert b"".join(out) == row
    assert b"" not in out


# -- SKIP: bulk and streaming --------------------------------------------------------------------


def test_run_of_skipped_messages_is_one_slice() -> None:
    rows = b"".join(data_row(i) for i in range(200)) + msg(b"N", b"SNOTICE\0\0")
    out, calls, _ = run([rows], table=SERVER_TABLE)
    assert out == [rows] and calls == []


def test_forwarded_inspected_messages_stay_in_the_run() -> None:
    out, calls, _ = run([STREAM])
    assert out == [STREAM]  # FORWARD everywhere: nothing is cut out
    assert len(calls) == 12


def test_large_datarow_is_streamed_chunk_by_chunk() -> None:
    row = data_row(10 * MB)
    tail = m.command_complete("SELECT 1") + m.ready_for_query()
    data = row + tail
    rec = Recorder()
    f = Framer(SERVER_TABLE, rec)
    total = b""
    for i in range(0, len(data), 64 * KB):
        chunk = data[i : i + 64 * KB]
        out = f.feed(chunk)
        assert sum(map(len, out)) == len(chunk) or i + 64 * KB >= len(row)
        assert all(len(s) <= 64 * KB for s in out)
        assert len(f._buf) < 64  # never gathered: at most a partial header is buffered
        total += b"".join(out)
    assert total == data
    assert [c[0] for c in rec.calls] == ["C", "Z"]


def test_streamed_chunks_are_the_input_objects() -> None:
    row = data_row(1 * MB)
    f = Framer(SERVER_TABLE, Recorder())
    f.feed(row[:100])
    chunk = row[100 : 100 + 64 * KB]
    (out,) = f.feed(chunk)
    assert out is chunk  # forwarded without a copy


def test_relay_gives_one_slice_as_it_is_and_several_as_a_list() -> None:
    # relay() is feed() without the list for the usual single slice (the session writes it).
    f = Framer(CLIENT_TABLE, Recorder())
    assert f.relay(STREAM) is STREAM
    assert f.relay(b"") is None
    assert f.relay(STREAM[:3]) is None  # a partial header: nothing to write yet
    assert f.relay(STREAM[3:]) == STREAM
    before, bad, after = m.query("SELECT 1"), m.query("DROP TABLE t"), m.sync()
    poison = m.query("POISON")
    f = Framer(CLIENT_TABLE, Recorder(_replace_query(poison)))
    assert f.relay(before + bad + after) == [before, poison, after]


# -- INSPECT and HEAD ----------------------------------------------------------------------------


def test_inspect_waits_for_the_whole_message() -> None:
    q = m.query("SELECT " + "x" * 1000)
    rec = Recorder()
    f = Framer(CLIENT_TABLE, rec)
    for i in range(0, len(q) - 1, 100):
        assert f.feed(q[i : min(i + 100, len(q) - 1)]) == []
    assert rec.calls == []
    assert f.feed(q[-1:]) == [q]
    assert rec.calls == [("Q", q)]


def test_head_calls_back_with_the_head_then_streams() -> None:
    b = bind(b"portal", b"stmt", b"v" * 10_000)
    rec = Recorder()
    f = Framer(CLIENT_TABLE, rec, head_bytes=32)
    out = f.feed(b[:20])
    assert out == [] and rec.calls == []
    out = f.feed(b[20:100])
    assert rec.calls == [("B", b[: 5 + 32])]
    assert out == [b[:100]]
    for i in range(100, len(b), 1000):
        assert f.feed(b[i : i + 1000]) == [b[i : i + 1000]]
    assert rec.calls == [("B", b[: 5 + 32])]
    assert f.idle
    assert m.parse_bind_head(*_seen(rec.calls[0][1])) == (b"portal", b"stmt")


def test_head_of_a_complete_long_message_is_still_only_the_head() -> None:
    b = bind(b"", b"", b"v" * 500)
    _, calls, _ = run([b], head_bytes=32)
    assert calls == [("B", b[: 5 + 32])]


def test_short_head_message_split_is_not_stalled() -> None:
    # Regression: a Bind shorter than head_bytes, arriving in pieces, waited for head_bytes
    # more bytes (that might never come: the client waits for BindComplete).
    b = bind(b"", b"s", b"1") + m.execute(b"") + m.sync()
    out, calls, f = run(bytewise(b))
    assert b"".join(out) == b
    assert [c[0] for c in calls] == ["B", "E", "S"]
    assert calls[0] == ("B", bind(b"", b"s", b"1"))
    assert f.idle


def _seen(seen: bytes) -> tuple[bytes, int, int]:
    return seen, 0, len(seen)


# -- replacement --------------------------------------------------------------------------------


def _replace_query(new: bytes) -> Callable[[str, bytes], Verdict]:
    def decide(typ: str, seen: bytes) -> Verdict:
        return new if typ == "Q" and b"DROP" in seen else FORWARD
    return decide


def test_replacement_replaces_exactly_one_message() -> None:
    before, bad, after = m.query("SELECT 1"), m.query("DROP TABLE t"), m.sync()
    data = before + bad + after
    poison = m.query("POISON")
    for chunks in [[data], bytewise(data), *(splits(data, random.Random(s)) for s in range(10))]:
        out, calls, _ = run(chunks, decide=_replace_query(poison))
        assert b"".join(out) == before + poison + after
        assert [c[0] for c in calls] == ["Q", "Q", "S"]
    out, _, _ = run([data], decide=_replace_query(poison))
    assert out == [before, poison, after]


def test_a_frame_handler_object_is_called_as_a_function_is() -> None:
    """The session passes FrameHandler objects (a C call when compiled): the same callbacks,
    and its verdicts count as a function's do."""
    class Poison(FrameHandler):
        def __init__(self) -> None:
            self.calls: list[tuple[int, bytes]] = []

        def on_frame(self, typ: int, buf: bytes, start: int, end: int) -> Verdict:
            self.calls.append((typ, bytes(buf[start:end])))
            return m.query("POISON") if b"DROP" in buf[start:end] else FORWARD

    data = m.query("SELECT 1") + m.query("DROP TABLE t") + m.sync()
    handler = Poison()
    framer = Framer(frame_table(INSPECT), handler)
    assert b"".join(framer.feed(data)) == m.query("SELECT 1") + m.query("POISON") + m.sync()
    assert handler.calls == [(ord("Q"), m.query("SELECT 1")), (ord("Q"), m.query("DROP TABLE t")),
                             (ord("S"), m.sync())]


def test_replacement_may_be_empty() -> None:
    data = m.query("SELECT 1") + m.query("DROP x") + m.sync()
    out, _, _ = run([data], decide=_replace_query(b""))
    assert b"".join(out) == m.query("SELECT 1") + m.sync()


def test_replacing_a_streaming_head_message_swallows_its_rest() -> None:
    # Regression: replacing a HEAD message whose tail had not arrived raised ProtocolError,
    # while the same message arriving whole was replaced: the outcome depended on the split.
    b = bind(b"", b"bad", b"v" * 5000)
    data = m.query("SELECT 1") + b + m.execute(b"") + m.sync()

    def decide(typ: str, seen: bytes) -> Verdict:
        return b"REPLACED" if typ == "B" else FORWARD

    expected = m.query("SELECT 1") + b"REPLACED" + m.execute(b"") + m.sync()
    chunkings = [[data], bytewise(data), *(splits(data, random.Random(s)) for s in range(20))]
    for chunks in chunkings:
        out, calls, f = run(chunks, decide=decide, head_bytes=16)
        assert b"".join(out) == expected
        assert [c[0] for c in calls] == ["Q", "B", "E", "S"]
        assert f.idle


# -- HOLD -----------------------------------------------------------------------------------------


def _hold_on(marker: bytes) -> Callable[[str, bytes], Verdict]:
    def decide(typ: str, seen: bytes) -> Verdict:
        return HOLD if marker in seen else FORWARD
    return decide


def test_hold_keeps_the_message_and_everything_after_it() -> None:
    first, held, rest = m.query("SELECT 1"), m.query("HOLD ME"), m.sync() + msg(b"d", b"row")
    out, calls, f = run([first + held + rest], decide=_hold_on(b"HOLD"))
    assert out == [first]
    assert f.holding and not f.idle
    assert f.backlog_size == len(held + rest)
    more = m.query("SELECT 2") + m.sync()[:2]
    assert f.feed(more) == []  # only appended
    assert f.backlog_size == len(held + rest + more)
    assert len(calls) == 2  # nothing after the held message was looked at yet
    out = f.resume(None)
    assert b"".join(out) == held + rest + more[:-2]
    assert not f.holding
    assert [c[0] for c in calls] == ["Q", "Q", "S", "Q"]
    assert b"".join(f.feed(m.sync()[2:])) == m.sync()
    assert f.idle


def test_resume_with_bytes_replaces_the_held_message() -> None:
    held, rest = m.query("HOLD ME"), m.sync()
    out, _, f = run([held + rest], decide=_hold_on(b"HOLD"))
    assert out == []
    out = f.resume(b"INSTEAD")
    assert b"".join(out) == b"INSTEAD" + rest
    assert f.idle


def test_resume_scans_on_and_may_hold_again() -> None:
    a, b = m.query("HOLD a"), m.query("HOLD b")
    data = m.query("x") + a + m.sync() + b + m.sync()
    for chunks in [[data], bytewise(data)]:
        out, calls, f = run(chunks, decide=_hold_on(b"HOLD"))
        assert b"".join(out) == m.query("x")
        second = f.resume(None)
        assert b"".join(second) == a + m.sync()
        assert f.holding
        assert f.backlog_size == len(b + m.sync())
        third = f.resume(b"")
        assert b"".join(third) == m.sync()
        assert [c[0] for c in calls] == ["Q", "Q", "S", "Q", "S"]
        assert f.idle


def test_hold_a_streaming_head_message_then_forward_it() -> None:
    b = bind(b"", b"hold", b"v" * 3000)
    out, _, f = run([b[:1000]], decide=_hold_on(b"hold"), head_bytes=16)
    assert out == [] and f.holding and f.backlog_size == 1000
    f.feed(b[1000:1500])
    assert f.backlog_size == 1500
    out = f.resume(None)
    assert b"".join(out) == b[:1500]
    out = f.feed(b[1500:] + m.sync())
    assert b"".join(out) == b[1500:] + m.sync()
    assert f.idle


def test_hold_a_streaming_head_message_then_replace_it() -> None:
    b = bind(b"", b"hold", b"v" * 3000)
    out, calls, f = run([b[:1000]], decide=_hold_on(b"hold"), head_bytes=16)
    out = f.resume(b"X")
    assert out == [b"X"]
    out = f.feed(b[1000:] + m.sync())
    assert b"".join(out) == m.sync()
    assert [c[0] for c in calls] == ["B", "S"]


def test_resume_without_hold_is_misuse() -> None:
    f = Framer(CLIENT_TABLE, Recorder())
    with pytest.raises(RuntimeError):
        f.resume(None)


# -- framing errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("typ", [b"A", b"Z", b"\0", b"\xff", b"1"])
def test_invalid_frontend_type(typ: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid message type"):
        run([m.query("SELECT 1") + msg(typ)])


@pytest.mark.parametrize("length", [0, 1, 3, -1, -(2**31)])
def test_length_below_four(length: int) -> None:
    # Regression for negative lengths: they were read unsigned and reported as too large.
    with pytest.raises(ProtocolError, match="invalid message length"):
        run([b"Q" + struct.pack("!i", length)])


def test_length_over_max_len_fails_before_the_body_arrives() -> None:
    for typ in (b"Q", b"d", b"B"):  # INSPECT, SKIP, HEAD
        at_limit = Framer(CLIENT_TABLE, Recorder(), max_len=1000)
        at_limit.feed(typ + struct.pack("!i", 1000))  # length counts itself, not the type byte
        over = Framer(CLIENT_TABLE, Recorder(), max_len=1000)
        with pytest.raises(MessageTooLarge):
            over.feed(typ + struct.pack("!i", 1001))  # the header alone is enough


def test_message_too_large_is_a_protocol_error() -> None:
    assert issubclass(MessageTooLarge, ProtocolError)


def test_errors_surface_however_the_bytes_are_split() -> None:
    data = m.query("SELECT 1") + b"Q\0\0\0\x02"
    for chunks in [[data], bytewise(data)]:
        with pytest.raises(ProtocolError):
            run(chunks)


# -- big inspected messages -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_large_query_in_small_chunks_is_gathered_once() -> None:
    q = m.query(b"SELECT '" + b"x" * (20 * MB) + b"'")
    rec = Recorder()
    f = Framer(CLIENT_TABLE, rec)
    out: list[bytes] = []
    for i in range(0, len(q), 64 * KB):
        out += f.feed(q[i : i + 64 * KB])
    assert len(rec.calls) == 1 and rec.calls[0][1] == q
    assert b"".join(out) == q
    assert f.idle


# -- frame_table ----------------------------------------------------------------------------------


def test_frame_table_modes() -> None:
    t = frame_table(INVALID, inspect="QP", head="B", skip="d")
    assert len(t) == 256
    assert t[ord("Q")] == t[ord("P")] == INSPECT
    assert t[ord("B")] == HEAD and t[ord("d")] == SKIP
    assert t[ord("Z")] == INVALID
    assert frame_table(SKIP, invalid="x")[ord("x")] == INVALID


def test_frame_table_rejects_unknown_mode_names() -> None:
    with pytest.raises(TypeError):
        frame_table(SKIP, inpsect="Q")


def test_client_table_matches_the_frontend_message_types() -> None:
    # PostgreSQL docs §55.7: frontend types. Everything else is a protocol violation.
    for ch in "QPESHCDFXcf":
        assert CLIENT_TABLE[ord(ch)] == INSPECT
    assert CLIENT_TABLE[ord("B")] == HEAD
    assert CLIENT_TABLE[ord("d")] == CLIENT_TABLE[ord("p")] == SKIP
    assert sum(1 for x in CLIENT_TABLE if x != INVALID) == 14


# -- LATER: bookkeeping after the bytes are written ---------------------------------------------

REPLY = b"".join([
    msg(b"2"), data_row(10), data_row(3000), msg(b"C", b"SELECT 2\0"), msg(b"Z", b"I"),
    msg(b"1"), msg(b"E", b"SERROR\0C42P01\0\0"), msg(b"S", b"a\0b\0"), msg(b"Z", b"E"),
])
LATER_TABLE = frame_table(INSPECT, skip="Dd", later="12CSZ")


def test_later_messages_are_forwarded_in_bulk_and_called_back_in_order() -> None:
    """A LATER message goes out with the run it is in (no flush at it) and is called back on
    run_later(), or before the next INSPECT callback: the order of callbacks is kept."""
    rec = Recorder()
    framer = Framer(LATER_TABLE, rec)
    out = framer.feed(REPLY)
    # The callbacks so far: the LATER ones before the ErrorResponse, then it (inspected).
    assert [c[0] for c in rec.calls] == list("2CZ1E")
    assert not framer.idle  # S and Z are waiting for run_later()
    assert out == [REPLY]  # nothing replaced: one slice, as a SKIP run would be
    framer.run_later()
    assert [c[0] for c in rec.calls] == list("2CZ1ESZ")
    assert rec.calls[-2][1] == msg(b"S", b"a\0b\0")
    assert framer.idle
    framer.run_later()  # nothing waiting: nothing called
    assert len(rec.calls) == 7


def test_later_callbacks_are_the_same_however_the_reply_is_split() -> None:
    _, want, _ = run([REPLY], table=frame_table(INSPECT, skip="Dd"))  # all called at once
    for chunks in [bytewise(REPLY)] + [splits(REPLY, random.Random(s)) for s in range(20)]:
        rec = Recorder()
        framer = Framer(LATER_TABLE, rec)
        out: list[bytes] = []
        for chunk in chunks:
            out += framer.feed(chunk)
            if random.Random(len(out)).random() < 0.5:  # an owner may run them at any feed
                framer.run_later()
        framer.run_later()
        assert b"".join(out) == REPLY
        assert rec.calls == want
        assert framer.idle


def test_later_verdict_is_ignored_and_replacement_still_works_for_inspect() -> None:
    def decide(typ: str, seen: bytes) -> Verdict:
        return b"!" if typ in "EZ" else FORWARD  # Z is LATER: already forwarded, ignored

    out, _, framer = run([REPLY], table=LATER_TABLE, decide=decide)
    framer.run_later()
    error = msg(b"E", b"SERROR\0C42P01\0\0")
    i = REPLY.index(error)
    assert b"".join(out) == REPLY[:i] + b"!" + REPLY[i + len(error):]


def test_a_table_must_have_256_entries() -> None:
    # Compiled, the framer indexes its table without bounds checks: a short one is refused.
    with pytest.raises(ValueError):
        Framer(b"\x00" * 255, lambda *a: None)
    framer = Framer(frame_table(SKIP), lambda *a: None)
    with pytest.raises(ValueError):
        framer.set_table(bytes(257))
    with pytest.raises(ValueError):
        frame_table(SKIP, inspect="Q\u0100")
