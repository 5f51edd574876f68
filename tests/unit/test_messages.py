"""Startup packets, frame parsers and builders (pgguard/protocol/messages.py).

Reference: PostgreSQL docs §55.7 "Message Formats". Parsers read `(buf, start, end)` of one whole
frame; each is tested on the frame alone and embedded in other bytes, to show it stays in bounds.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from pgguard.errors import ProtocolError
from pgguard.protocol import messages as m


def msg(tag: bytes, body: bytes = b"") -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", len(body) + 8, code) + body


def both_ways(parser: Callable[[bytes, int, int], Any], frame: bytes) -> Any:
    """Parse `frame` alone and embedded between other bytes; the results must agree."""
    alone = parser(frame, 0, len(frame))
    embedded = parser(b"\0junk" + frame + b"more\0", 5, 5 + len(frame))
    assert alone == embedded
    return alone


def fails(parser: Callable[[bytes, int, int], Any], frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        parser(frame, 0, len(frame))
    with pytest.raises(ProtocolError):  # bytes past `end` must not rescue a bad frame
        parser(frame + b"\0\0\0\0\0\0\0\0", 0, len(frame))


# -- startup packets -------------------------------------------------------------------------------


def test_ssl_request() -> None:
    assert m.ssl_request() == packet(80877103)
    assert m.parse_startup_packet(m.ssl_request()) == m.SSLRequest()


def test_gssenc_request() -> None:
    assert m.parse_startup_packet(packet(80877104)) == m.GSSENCRequest()


@pytest.mark.parametrize("code", [m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE])
def test_encryption_requests_have_no_body(code: int) -> None:
    with pytest.raises(ProtocolError):
        m.parse_startup_packet(packet(code, b"\0\0\0\0"))


def test_cancel_request_protocol_3_0() -> None:
    raw = packet(80877102, struct.pack("!i", 1234) + b"\x01\x02\x03\x04")
    assert len(raw) == 16
    assert m.parse_startup_packet(raw) == m.CancelRequest(1234, b"\x01\x02\x03\x04")


def test_cancel_request_protocol_3_2_wide_key() -> None:
    key = bytes(range(32))
    raw = packet(80877102, struct.pack("!i", 77) + key)
    assert len(raw) == 44
    assert m.parse_startup_packet(raw) == m.CancelRequest(77, key)


def test_cancel_request_key_limits() -> None:
    assert m.parse_startup_packet(m.cancel_request(1, b"k" * 256)).secret == b"k" * 256
    for key in (b"", b"abc", b"k" * 257):
        with pytest.raises(ProtocolError):
            m.parse_startup_packet(m.cancel_request(1, key))


def test_cancel_request_negative_pid_round_trips() -> None:
    assert m.parse_startup_packet(m.cancel_request(-5, b"abcd")) == m.CancelRequest(-5, b"abcd")


@pytest.mark.parametrize("minor", [0, 2])
def test_startup_message(minor: int) -> None:
    body = b"user\0app\0database\0db\0options\0-c x=y\0application_name\0\0\0"
    raw = packet((3 << 16) | minor, body)
    got = m.parse_startup_packet(raw)
    assert isinstance(got, m.StartupMessage)
    assert (got.major, got.minor) == (3, minor)
    assert got.params == {"user": "app", "database": "db", "options": "-c x=y",
                          "application_name": ""}
    assert got.raw == raw


def test_startup_message_without_parameters() -> None:
    got = m.parse_startup_packet(packet(0x00030000, b"\0"))
    assert isinstance(got, m.StartupMessage) and got.params == {}


def test_startup_message_utf8_parameters() -> None:
    got = m.parse_startup_packet(m.startup_message({"user": "jürgen", "application_name": "日本"}))
    assert isinstance(got, m.StartupMessage)
    assert got.params == {"user": "jürgen", "application_name": "日本"}


@pytest.mark.parametrize("body", [
    b"",                          # no terminator at all
    b"user\0app\0",               # list not terminated
    b"user\0app",                 # value not terminated
    b"user\0app\0\0extra",        # bytes after the terminator
    b"user\0app\0\0\0",           # a second terminator
    b"user\0\0",                  # name without value (the terminator is read as its value)
    b"\0x\0\0",                   # bytes after an early terminator
    b"\0\0\0",                    # empty name with a value
    b"user\0\xff\xfe\0\0",        # not UTF-8
    b"\xc3\0app\0\0",             # truncated UTF-8 in the name
])
def test_bad_startup_message(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.parse_startup_packet(packet(0x00030000, body))


@pytest.mark.parametrize("code", [0x00020000, 0x00010000, 0x00040000, 0, 80877105,
                                  (1234 << 16) | 5680])
def test_unsupported_protocol_codes(code: int) -> None:
    with pytest.raises(ProtocolError):
        m.parse_startup_packet(packet(code, b"user\0app\0\0"))


def test_startup_packet_length() -> None:
    assert m.startup_packet_length(b"") is None
    assert m.startup_packet_length(b"\0\0\0") is None
    assert m.startup_packet_length(m.ssl_request()) == 8
    assert m.startup_packet_length(struct.pack("!i", 10000)) == 10000
    for bad in (0, 4, 7, 10001, 2**31 - 1):
        with pytest.raises(ProtocolError):
            m.startup_packet_length(struct.pack("!i", bad))


@pytest.mark.parametrize("raw", [
    b"",
    b"\0\0\0\x08\x04\xd2",                          # shorter than 8
    struct.pack("!ii", 16, 80877103),               # length word says 16, packet has 8
    struct.pack("!ii", 8, 80877102) + b"\0" * 8,    # cancel whose length word says 8
    struct.pack("!ii", 4, 0x00030000) + b"\0",      # length word below 8
    struct.pack("!ii", 10001, 0x00030000) + b"u\0a\0" + b"\0" * 9989,  # over the cap
])
def test_startup_packet_length_word_is_checked(raw: bytes) -> None:
    # Regression: the length word was ignored, so a packet that disagreed with it parsed.
    with pytest.raises(ProtocolError):
        m.parse_startup_packet(raw)


def test_startup_message_builder_negotiates_minor() -> None:
    raw = m.startup_message({"user": "u"}, minor=2)
    assert raw == packet(0x00030002, b"user\0u\0\0")


# -- frame parsers ---------------------------------------------------------------------------------


def test_parse_query() -> None:
    assert both_ways(m.parse_query, m.query("SELECT 1")) == b"SELECT 1"
    assert both_ways(m.parse_query, m.query("")) == b""
    assert both_ways(m.parse_query, m.query(b"\xff\xfe")) == b"\xff\xfe"  # still encoded


@pytest.mark.parametrize("frame", [
    msg(b"Q", b"SELECT 1"),          # unterminated
    msg(b"Q", b"SELECT 1\0x"),       # trailing bytes
    msg(b"Q", b"SELECT\0 1\0"),      # a NUL inside
    msg(b"Q"),                       # empty body
])
def test_parse_query_malformed(frame: bytes) -> None:
    fails(m.parse_query, frame)


def test_parse_parse() -> None:
    assert both_ways(m.parse_parse, m.parse(b"s1", "SELECT $1, $2", [23, 25])) == \
        (b"s1", b"SELECT $1, $2")
    assert both_ways(m.parse_parse, m.parse(b"", "SELECT 1")) == (b"", b"SELECT 1")


@pytest.mark.parametrize("frame", [
    msg(b"P", b"s\0SELECT 1\0"),                              # no type count
    msg(b"P", b"s\0SELECT 1\0\0"),                            # half a type count
    msg(b"P", b"s\0SELECT 1\0\0\x01"),                        # one type announced, none there
    msg(b"P", b"s\0SELECT 1\0\0\x00\0\0\0\x17"),              # a type not announced
    msg(b"P", b"s\0SELECT 1\0\0\x01\0\0\0\x17\0"),            # trailing byte
    msg(b"P", b"s\0SELECT 1"),                                # unterminated text
    msg(b"P", b"s"),                                          # unterminated name
    msg(b"P"),
])
def test_parse_parse_malformed(frame: bytes) -> None:
    fails(m.parse_parse, frame)


def test_parse_bind_head() -> None:
    frame = msg(b"B", b"portal\0stmt\0" + struct.pack("!hhihh", 0, 1, 1, 0, 0)[:-2] + b"x")
    assert both_ways(m.parse_bind_head, frame) == (b"portal", b"stmt")
    # A streamed head: only the first bytes of the message are there.
    assert m.parse_bind_head(frame, 0, 5 + len(b"portal\0stmt\0")) == (b"portal", b"stmt")


@pytest.mark.parametrize("frame", [msg(b"B", b"portal"), msg(b"B", b"portal\0stmt"), msg(b"B")])
def test_parse_bind_head_malformed(frame: bytes) -> None:
    fails(m.parse_bind_head, frame)


def test_parse_execute() -> None:
    assert both_ways(m.parse_execute, m.execute(b"p", 200)) == (b"p", 200)
    assert both_ways(m.parse_execute, m.execute(b"")) == (b"", 0)


@pytest.mark.parametrize("frame", [
    msg(b"E", b"p\0\0\0\0"),       # short row count
    msg(b"E", b"p\0\0\0\0\0\0"),   # long row count
    msg(b"E", b"p"),
    msg(b"E"),
])
def test_parse_execute_malformed(frame: bytes) -> None:
    fails(m.parse_execute, frame)


def test_parse_named() -> None:
    assert both_ways(m.parse_named, msg(b"D", b"Sstmt\0")) == (ord("S"), b"stmt")
    assert both_ways(m.parse_named, msg(b"C", b"P\0")) == (ord("P"), b"")


@pytest.mark.parametrize("frame", [
    msg(b"D", b"X\0"),        # neither S nor P
    msg(b"D", b"S"),          # no name
    msg(b"D", b"Sname"),      # unterminated
    msg(b"C", b"Sa\0b"),      # trailing bytes
    msg(b"D"),
])
def test_parse_named_malformed(frame: bytes) -> None:
    fails(m.parse_named, frame)


def test_parse_fields() -> None:
    frame = msg(b"E", b"SERROR\0VERROR\0C42501\0Mdenied\0\0")
    assert both_ways(m.parse_fields, frame) == {"S": "ERROR", "V": "ERROR", "C": "42501",
                                                "M": "denied"}
    assert both_ways(m.parse_fields, msg(b"N", b"\0")) == {}
    assert both_ways(m.parse_fields, msg(b"E", b"M\xff\0\0")) == {"M": "\ufffd"}


@pytest.mark.parametrize("frame", [
    msg(b"E", b"SERROR\0"),               # list not terminated (regression: was accepted)
    msg(b"E", b"SERROR\0\0trailing"),     # bytes after the terminator (regression)
    msg(b"E", b"SERROR"),                 # value not terminated
    msg(b"E", b"S"),
    msg(b"E"),                            # no terminator at all (regression)
])
def test_parse_fields_malformed(frame: bytes) -> None:
    fails(m.parse_fields, frame)


def test_parse_parameter_status() -> None:
    assert both_ways(m.parse_parameter_status, m.parameter_status("client_encoding", "UTF8")) \
        == ("client_encoding", "UTF8")
    assert both_ways(m.parse_parameter_status, msg(b"S", b"a\0\0")) == ("a", "")


@pytest.mark.parametrize("frame", [
    msg(b"S", b"name\0value"),
    msg(b"S", b"name"),
    msg(b"S", b"name\0value\0x"),   # trailing bytes (regression: was accepted)
    msg(b"S"),
])
def test_parse_parameter_status_malformed(frame: bytes) -> None:
    fails(m.parse_parameter_status, frame)


def test_parse_auth_code() -> None:
    assert both_ways(m.parse_auth_code, msg(b"R", struct.pack("!i", 0))) == 0
    assert both_ways(m.parse_auth_code, msg(b"R", struct.pack("!i", 5) + b"salt")) == 5
    fails(m.parse_auth_code, msg(b"R", b"\0\0\0"))


def test_parse_sasl_mechanisms() -> None:
    frame = m.authentication_sasl([b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"])
    assert both_ways(m.parse_sasl_mechanisms, frame) == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]
    assert both_ways(m.parse_sasl_mechanisms, m.authentication_sasl([])) == []


@pytest.mark.parametrize("frame", [
    msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\0"),       # list not terminated
    msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256"),         # name not terminated
    msg(b"R", struct.pack("!i", 10) + b"A\0\0B\0"),              # trailing bytes
    msg(b"R", struct.pack("!i", 10)),                            # no list
    msg(b"R", b"\0\0"),                                          # no code
])
def test_parse_sasl_mechanisms_malformed(frame: bytes) -> None:
    # Regression: an unterminated or cut list was accepted as a shorter list.
    fails(m.parse_sasl_mechanisms, frame)


# -- builders: exact bytes ---------------------------------------------------------------------------


def test_fixed_builders() -> None:
    assert m.sync() == msg(b"S")
    assert m.terminate() == msg(b"X")
    assert m.ready_for_query() == msg(b"Z", b"I")
    assert m.ready_for_query(b"T") == msg(b"Z", b"T")
    assert m.command_complete("SELECT 1") == msg(b"C", b"SELECT 1\0")
    assert m.backend_key_data(7, b"k" * 32) == msg(b"K", struct.pack("!i", 7) + b"k" * 32)
    assert m.negotiate_protocol_version(2, ["_pq_.a", "_pq_.b"]) == \
        msg(b"v", struct.pack("!ii", 2, 2) + b"_pq_.a\0_pq_.b\0")


def test_row_description_and_data_row() -> None:
    assert m.row_description(["a"]) == msg(
        b"T", struct.pack("!h", 1) + b"a\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0))
    assert m.data_row(["xy", None]) == msg(
        b"D", struct.pack("!hi", 2, 2) + b"xy" + struct.pack("!i", -1))


# -- builders: round trips through the parsers --------------------------------------------------------


def test_error_response_round_trip() -> None:
    frame = m.error_response("42501", "permission denied", detail="d", hint="h",
                             severity="FATAL")
    assert frame[:1] == b"E"
    assert both_ways(m.parse_fields, frame) == {"S": "FATAL", "V": "FATAL", "C": "42501",
                                                "M": "permission denied", "D": "d", "H": "h"}
    frame = m.notice_response("01000", "ünïcode")
    assert frame[:1] == b"N"
    assert both_ways(m.parse_fields, frame) == {"S": "NOTICE", "V": "NOTICE", "C": "01000",
                                                "M": "ünïcode"}


def test_parameter_status_round_trip() -> None:
    frame = m.parameter_status("TimeZone", "Europe/Zürich")
    assert both_ways(m.parse_parameter_status, frame) == ("TimeZone", "Europe/Zürich")


def test_query_round_trip() -> None:
    assert both_ways(m.parse_query, m.query("SELECT 'é'")) == "SELECT 'é'".encode()


def test_parse_round_trip_with_wide_oids_and_many_parameters() -> None:
    # Regression: type OIDs are unsigned (up to 2^32-1) and the count is read unsigned;
    # the builder packed them signed and failed with struct.error.
    frame = m.parse(b"s", "SELECT $1", [4_000_000_000])
    assert both_ways(m.parse_parse, frame) == (b"s", b"SELECT $1")
    assert frame.endswith(struct.pack("!HI", 1, 4_000_000_000))
    frame = m.parse(b"", "SELECT", [25] * 40_000)
    assert both_ways(m.parse_parse, frame) == (b"", b"SELECT")


def test_execute_round_trip() -> None:
    for rows in (0, 1, 2**31 - 1):
        assert both_ways(m.parse_execute, m.execute(b"portal", rows)) == (b"portal", rows)


def test_startup_message_round_trip() -> None:
    params = {"user": "app", "database": "app", "client_encoding": "UTF8", "_pq_.x": "1"}
    for minor in (0, 2):
        got = m.parse_startup_packet(m.startup_message(params, minor))
        assert isinstance(got, m.StartupMessage)
        assert (got.major, got.minor, dict(got.params)) == (3, minor, params)


@pytest.mark.parametrize("key", [b"abcd", bytes(range(32))])
def test_cancel_request_round_trip(key: bytes) -> None:
    assert m.parse_startup_packet(m.cancel_request(4242, key)) == m.CancelRequest(4242, key)


def test_authentication_sasl_round_trip() -> None:
    mechs = [b"SCRAM-SHA-256"]
    frame = m.authentication_sasl(mechs)
    assert both_ways(m.parse_auth_code, frame) == 10
    assert both_ways(m.parse_sasl_mechanisms, frame) == mechs
