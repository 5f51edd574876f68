"""Hypothesis properties of the sans-IO codec (STYLE rule 1): random bytes yield messages or a
ProtocolError, never anything else; valid streams survive any split identically; builders
round-trip through the parsers."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgguard.errors import ProtocolError
from pgguard.protocol import messages as m
from pgguard.protocol.framing import FORWARD, HOLD, Framer, Verdict
from pgguard.proxy.session import CLIENT_TABLE, SERVER_TABLE

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

Call = tuple[int, bytes]


def msg(tag: bytes, body: bytes = b"") -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def parse_like_the_proxy(typ: int, buf: bytes, start: int, end: int) -> object:
    """What session.py parses for each client message it inspects."""
    if typ == 0x51:
        return m.parse_query(buf, start, end)
    if typ == 0x50:
        return m.parse_parse(buf, start, end)
    if typ == 0x42:
        return m.parse_bind_head(buf, start, end)
    if typ == 0x45:
        return m.parse_execute(buf, start, end)
    if typ in (0x44, 0x43):
        return m.parse_named(buf, start, end)
    return None


class Run:
    """Feed chunks into a Framer; record output, callbacks and the exception type, if any."""

    def __init__(self, table: bytes, chunks: Sequence[bytes], *, parse: bool = False,
                 decide: Callable[[int, bytes], Verdict] | None = None,
                 head_bytes: int = 4096, max_len: int = 0x7FFFFFFF) -> None:
        self.calls: list[Call] = []
        self.out: list[bytes] = []
        self.error: type[BaseException] | None = None

        def on_frame(typ: int, buf: bytes, start: int, end: int) -> Verdict:
            seen = bytes(buf[start:end])
            self.calls.append((typ, seen))
            if parse:
                parse_like_the_proxy(typ, buf, start, end)
            return decide(typ, seen) if decide else FORWARD

        self.framer = Framer(table, on_frame, head_bytes=head_bytes, max_len=max_len)
        try:
            for c in chunks:
                self.out += self.framer.feed(c)
        except ProtocolError as exc:  # MessageTooLarge included; anything else fails the test
            self.error = type(exc)

    @property
    def output(self) -> bytes:
        return b"".join(self.out)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


cut_lists = st.lists(st.integers(min_value=0, max_value=10**6), max_size=30)


# -- random bytes -----------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=2000), cut_lists)
def test_random_bytes_into_the_client_framer(data: bytes, cuts: list[int]) -> None:
    whole = Run(CLIENT_TABLE, [data], parse=True, max_len=1 << 16)
    pieces = Run(CLIENT_TABLE, split(data, cuts), parse=True, max_len=1 << 16)
    assert whole.error == pieces.error
    if whole.error is None:
        assert whole.output == pieces.output
        assert whole.calls == pieces.calls
        assert data.startswith(whole.output)  # FORWARD everywhere: a prefix of the input
    else:
        assert data.startswith(pieces.output)  # what got out before the error is unchanged


def _message_shaped(tags: bytes) -> st.SearchStrategy[bytes]:
    """Random bodies in valid frames: gets past framing and into the parsers."""
    return st.builds(lambda t, body: msg(bytes([t]), body), st.sampled_from(tags),
                     st.binary(max_size=60))


@SETTINGS
@given(st.lists(_message_shaped(b"QPBEDCSHXFcfdp"), max_size=12), cut_lists)
def test_random_bodies_into_the_client_framer(frames: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frames)
    whole = Run(CLIENT_TABLE, [data], parse=True, head_bytes=16)
    pieces = Run(CLIENT_TABLE, split(data, cuts), parse=True, head_bytes=16)
    assert whole.error == pieces.error
    if whole.error is None:
        assert whole.output == pieces.output == data
        assert whole.calls == pieces.calls


@SETTINGS
@given(st.binary(max_size=2000), cut_lists)
def test_random_bytes_into_the_server_framer(data: bytes, cuts: list[int]) -> None:
    whole = Run(SERVER_TABLE, [data])
    pieces = Run(SERVER_TABLE, split(data, cuts))
    assert whole.error == pieces.error
    if whole.error is None:
        assert whole.output == pieces.output == data[: len(whole.output)]
        assert whole.calls == pieces.calls


@SETTINGS
@given(st.binary(max_size=300))
def test_random_startup_packet(data: bytes) -> None:
    try:
        m.startup_packet_length(data)
        got = m.parse_startup_packet(data)
    except ProtocolError:
        return
    assert isinstance(got, m.SSLRequest | m.GSSENCRequest | m.CancelRequest | m.StartupMessage)


@SETTINGS
@given(st.sampled_from([m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE, m.CANCEL_REQUEST_CODE,
                        0x00030000, 0x00030002, 0x00020000]) | st.integers(0, 2**32 - 1),
       st.binary(max_size=300))
def test_random_startup_bodies(code: int, body: bytes) -> None:
    raw = struct.pack("!iI", len(body) + 8, code) + body
    try:
        got = m.parse_startup_packet(raw)
    except ProtocolError:
        return
    if isinstance(got, m.StartupMessage):
        assert got.raw == raw
        assert m.parse_startup_packet(m.startup_message(got.params, got.minor)).params == \
            got.params


PARSERS = [m.parse_query, m.parse_parse, m.parse_bind_head, m.parse_execute, m.parse_named,
           m.parse_fields, m.parse_parameter_status, m.parse_auth_code, m.parse_sasl_mechanisms]


@SETTINGS
@given(st.sampled_from(PARSERS), st.binary(max_size=1), st.binary(max_size=80),
       st.binary(max_size=8), st.binary(max_size=8))
def test_random_frames_into_the_parsers(parser: Callable[[bytes, int, int], object],
                                        tag: bytes, body: bytes, before: bytes,
                                        after: bytes) -> None:
    frame = (tag or b"?") + struct.pack("!i", len(body) + 4) + body
    buf = before + frame + after
    try:
        got = parser(buf, len(before), len(before) + len(frame))
    except ProtocolError:
        return
    assert got == parser(frame, 0, len(frame))  # bytes outside the frame do not matter


# -- valid streams survive any split ----------------------------------------------------------------


cstr = st.binary(max_size=20).map(lambda b: b.replace(b"\0", b""))
sql_text = st.text(max_size=40).map(lambda s: s.replace("\0", "").encode("utf-8", "replace"))

client_message = st.one_of(
    sql_text.map(m.query),
    st.builds(lambda n, s, t: m.parse(n, s, t), cstr, sql_text,
              st.lists(st.integers(0, 2**32 - 1), max_size=4)),
    st.builds(lambda p, s, v: msg(b"B", p + b"\0" + s + b"\0" + struct.pack("!hhi", 0, 1, len(v))
                                  + v + b"\0\0"), cstr, cstr, st.binary(max_size=200)),
    st.builds(m.execute, cstr, st.integers(0, 2**31 - 1)),
    st.builds(lambda k, n: msg(k, b"S" + n + b"\0"), st.sampled_from([b"D", b"C"]), cstr),
    st.just(m.sync()), st.just(msg(b"H")), st.just(msg(b"c")),
    st.builds(lambda d: msg(b"d", d), st.binary(max_size=300)),
    st.builds(lambda d: msg(b"f", d + b"\0"), cstr),
)


def _poison_queries(typ: int, seen: bytes) -> Verdict:
    """Replace Queries whose text has an odd length, and Binds naming a statement with 'x'."""
    if typ == 0x51 and len(seen) % 2:
        return m.query("POISON")
    if typ == 0x42 and b"x" in m.parse_bind_head(seen, 0, len(seen))[1]:
        return b""
    return FORWARD


@SETTINGS
@given(st.lists(client_message, max_size=15), cut_lists, st.sampled_from([48, 4096]))
def test_valid_streams_survive_any_split(frames: list[bytes], cuts: list[int],
                                         head_bytes: int) -> None:
    data = b"".join(frames)
    whole = Run(CLIENT_TABLE, [data], parse=True, decide=_poison_queries, head_bytes=head_bytes)
    pieces = Run(CLIENT_TABLE, split(data, cuts), parse=True, decide=_poison_queries,
                 head_bytes=head_bytes)
    bytewise = Run(CLIENT_TABLE, [data[i : i + 1] for i in range(len(data))], parse=True,
                   decide=_poison_queries, head_bytes=head_bytes)
    assert whole.error is pieces.error is bytewise.error is None
    assert whole.output == pieces.output == bytewise.output
    assert whole.calls == pieces.calls == bytewise.calls
    assert len(whole.calls) == sum(1 for f in frames if f[:1] not in (b"d",))
    assert whole.framer.idle and pieces.framer.idle and bytewise.framer.idle
    if not any(_poison_queries(f[0], f) is not FORWARD for f in frames):
        assert whole.output == data


@SETTINGS
@given(st.lists(client_message, min_size=1, max_size=12), cut_lists, st.data())
def test_hold_and_resume_forward_equals_no_hold(frames: list[bytes], cuts: list[int],
                                                data_: st.DataObject) -> None:
    """Holding any inspected message and resuming with FORWARD changes nothing on the wire."""
    data = b"".join(frames)
    plain = Run(CLIENT_TABLE, [data])
    n_calls = len(plain.calls)
    if not n_calls:
        return
    hold_at = data_.draw(st.sets(st.integers(0, n_calls - 1)))
    count = [0]

    def decide(typ: int, seen: bytes) -> Verdict:
        i = count[0]
        count[0] += 1
        return HOLD if i in hold_at else FORWARD

    seen: list[Call] = []

    def on_frame(typ: int, buf: bytes, start: int, end: int) -> Verdict:
        seen.append((typ, bytes(buf[start:end])))
        return decide(typ, bytes(buf[start:end]))

    framer = Framer(CLIENT_TABLE, on_frame)
    out: list[bytes] = []
    for chunk in split(data, cuts):
        out += framer.feed(chunk)
        while framer.holding and data_.draw(st.booleans(), label="resume now"):
            out += framer.resume(None)
    while framer.holding:
        out += framer.resume(None)
    assert b"".join(out) == data
    assert seen == plain.calls


# -- builders round-trip ----------------------------------------------------------------------------


text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=30)
nonempty_text = text.filter(bool)
name_bytes = st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b)


@SETTINGS
@given(st.text(min_size=5, max_size=5), text, text, st.none() | nonempty_text,
       st.none() | nonempty_text)
def test_error_and_notice_response_round_trip(sqlstate: str, message: str, severity: str,
                                              detail: str | None, hint: str | None) -> None:
    sqlstate = sqlstate.replace("\0", "0")
    for build in (m.error_response, m.notice_response):
        frame = build(sqlstate, message, severity=severity or "ERROR", detail=detail,
                      hint=hint)
        fields = m.parse_fields(frame, 0, len(frame))
        expected = {"S": severity or "ERROR", "V": severity or "ERROR", "C": sqlstate,
                    "M": message}
        if detail:
            expected["D"] = detail
        if hint:
            expected["H"] = hint
        assert fields == expected


@SETTINGS
@given(text, text)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    frame = m.parameter_status(name, value)
    assert m.parse_parameter_status(frame, 0, len(frame)) == (name, value)


@SETTINGS
@given(st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"")))
def test_query_round_trip(sql: bytes) -> None:
    frame = m.query(sql)
    assert m.parse_query(frame, 0, len(frame)) == sql


@SETTINGS
@given(st.binary(max_size=30).map(lambda b: b.replace(b"\0", b"")), text,
       st.lists(st.integers(0, 2**32 - 1), max_size=20))
def test_parse_round_trip(name: bytes, sql: str, types: list[int]) -> None:
    frame = m.parse(name, sql, types)
    assert m.parse_parse(frame, 0, len(frame)) == (name, sql.encode())


@SETTINGS
@given(st.binary(max_size=30).map(lambda b: b.replace(b"\0", b"")),
       st.integers(-(2**31), 2**31 - 1))
def test_execute_round_trip(portal: bytes, rows: int) -> None:
    frame = m.execute(portal, rows)
    assert m.parse_execute(frame, 0, len(frame)) == (portal, rows)


@SETTINGS
@given(st.dictionaries(nonempty_text, text, max_size=8), st.integers(0, 0xFFFF))
def test_startup_message_round_trip(params: dict[str, str], minor: int) -> None:
    raw = m.startup_message(params, minor)
    if len(raw) > m.MAX_STARTUP_PACKET:
        return
    got = m.parse_startup_packet(raw)
    assert isinstance(got, m.StartupMessage)
    assert (got.major, got.minor, dict(got.params), got.raw) == (3, minor, params, raw)


@SETTINGS
@given(st.integers(-(2**31), 2**31 - 1), st.binary(min_size=4, max_size=256))
def test_cancel_request_round_trip(pid: int, secret: bytes) -> None:
    assert m.parse_startup_packet(m.cancel_request(pid, secret)) == m.CancelRequest(pid, secret)


@SETTINGS
@given(st.lists(name_bytes, max_size=5))
def test_authentication_sasl_round_trip(mechs: list[bytes]) -> None:
    frame = m.authentication_sasl(mechs)
    assert m.parse_auth_code(frame, 0, len(frame)) == 10
    assert m.parse_sasl_mechanisms(frame, 0, len(frame)) == mechs
