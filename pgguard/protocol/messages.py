"""PostgreSQL v3 messages: the startup packets, parsers for the frontend messages pgguard
inspects, and builders for the messages it writes itself.

References: PostgreSQL docs, "Frontend/Backend Protocol" (§55.2 message flow, §55.7 message
formats). Message bodies are parsed from `(buf, start, end)` of a whole frame, type byte
included, so the relay never copies a message just to look at it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pgguard.errors import ProtocolError

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_STARTUP_PACKET",
    "SSL_REQUEST_CODE",
    "CancelRequest",
    "GSSENCRequest",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "authentication_sasl",
    "backend_key_data",
    "cancel_request",
    "command_complete",
    "data_row",
    "error_response",
    "execute",
    "flush",
    "negotiate_protocol_version",
    "notice_response",
    "parameter_status",
    "parse",
    "parse_auth_code",
    "parse_bind_head",
    "parse_execute",
    "parse_fields",
    "parse_named",
    "parse_parameter_status",
    "parse_parse",
    "parse_query",
    "parse_sasl_mechanisms",
    "parse_startup_packet",
    "query",
    "ready_for_query",
    "row_description",
    "ssl_request",
    "startup_message",
    "startup_packet_length",
    "sync",
    "terminate",
]

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
MAX_STARTUP_PACKET = 10000  # MAX_STARTUP_PACKET_LENGTH in PostgreSQL's pqcomm.h
PROTOCOL_3_0 = 0x00030000
NEWEST_MINOR = 2  # protocol 3.2 (PostgreSQL 18): variable-length cancel keys


# -- startup phase ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes  # 4 bytes (3.0) or 4..256 bytes (3.2)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: Mapping[str, str]
    raw: bytes


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def startup_packet_length(buf: bytes) -> int | None:
    """The length of the packet at the start of `buf` (None until 4 bytes are there)."""
    if len(buf) < 4:
        return None
    length = int.from_bytes(buf[:4], "big")
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolError(f"invalid startup packet length {length}")
    return length


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Parse one whole startup-phase packet (length word included)."""
    if len(packet) < 8:
        raise ProtocolError("startup packet too short")
    if startup_packet_length(packet) != len(packet):
        raise ProtocolError("startup packet length does not match its length word")
    code = int.from_bytes(packet[4:8], "big")
    if code == SSL_REQUEST_CODE:
        if len(packet) != 8:
            raise ProtocolError("invalid SSLRequest length")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(packet) != 8:
            raise ProtocolError("invalid GSSENCRequest length")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if not 16 <= len(packet) <= 12 + 256:
            raise ProtocolError("invalid CancelRequest length")
        return CancelRequest(int.from_bytes(packet[8:12], "big", signed=True), bytes(packet[12:]))
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolError(f"unsupported frontend protocol {major}.{minor}")
    params: dict[str, str] = {}
    parts = bytes(packet[8:]).split(b"\0")
    # The list ends with an empty name: "k\0v\0k\0v\0\0" splits into [k, v, k, v, '', ''].
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolError("startup packet is not terminated")
    fields = parts[:-2]
    if len(fields) % 2:
        raise ProtocolError("startup packet has a name without a value")
    for i in range(0, len(fields), 2):
        try:
            key, value = fields[i].decode(), fields[i + 1].decode()
        except UnicodeDecodeError:
            raise ProtocolError("startup packet is not valid UTF-8") from None
        if not key:
            raise ProtocolError("empty startup parameter name")
        params[key] = value
    return StartupMessage(major, minor, params, bytes(packet))


def startup_message(params: Mapping[str, str], minor: int = 0) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!ii", len(body) + 8, (3 << 16) | minor) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: bytes) -> bytes:
    return struct.pack("!iii", 12 + len(secret), CANCEL_REQUEST_CODE, pid) + secret


# -- parsing frames (buf[start:end] is a whole message, type byte included) ---------------------


def _cstr(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    nul = buf.find(b"\0", pos, end)
    if nul < 0:
        raise ProtocolError("unterminated string in message")
    return buf[pos:nul], nul + 1


def parse_query(buf: bytes, start: int, end: int) -> bytes:
    """Query ('Q'): the SQL text, still encoded."""
    text, pos = _cstr(buf, start + 5, end)
    if pos != end:
        raise ProtocolError("trailing bytes in Query")
    return text


def parse_parse(buf: bytes, start: int, end: int) -> tuple[bytes, bytes]:
    """Parse ('P') → (statement name, SQL text)."""
    name, pos = _cstr(buf, start + 5, end)
    text, pos = _cstr(buf, pos, end)
    if pos + 2 > end:
        raise ProtocolError("truncated Parse")
    ntypes = int.from_bytes(buf[pos : pos + 2], "big")
    if pos + 2 + 4 * ntypes != end:
        raise ProtocolError("bad parameter type count in Parse")
    return name, text


def parse_bind_head(buf: bytes, start: int, end: int) -> tuple[bytes, bytes]:
    """Bind ('B') → (portal, statement); `end` may stop after the names (a streamed head)."""
    portal, pos = _cstr(buf, start + 5, end)
    stmt, _ = _cstr(buf, pos, end)
    return portal, stmt


def parse_execute(buf: bytes, start: int, end: int) -> tuple[bytes, int]:
    """Execute ('E') → (portal, max rows)."""
    portal, pos = _cstr(buf, start + 5, end)
    if pos + 4 != end:
        raise ProtocolError("bad Execute length")
    return portal, int.from_bytes(buf[pos:end], "big", signed=True)


def parse_named(buf: bytes, start: int, end: int) -> tuple[int, bytes]:
    """Describe ('D') or Close ('C') → (b'S' or b'P' as int, name)."""
    if end - start < 7:
        raise ProtocolError("truncated Describe/Close")
    kind = buf[start + 5]
    if kind not in (0x53, 0x50):  # 'S', 'P'
        raise ProtocolError(f"invalid Describe/Close target {chr(kind)!r}")
    name, pos = _cstr(buf, start + 6, end)
    if pos != end:
        raise ProtocolError("trailing bytes in Describe/Close")
    return kind, name


def parse_fields(buf: bytes, start: int, end: int) -> dict[str, str]:
    """ErrorResponse/NoticeResponse fields: {'S': 'ERROR', 'C': '42501', 'M': ...}."""
    fields: dict[str, str] = {}
    pos = start + 5
    while pos < end and buf[pos] != 0:
        code = chr(buf[pos])
        value, pos = _cstr(buf, pos + 1, end)
        fields[code] = value.decode("utf-8", "replace")
    if pos != end - 1:  # the list ends with one zero byte, the last of the message
        raise ProtocolError("unterminated or trailing bytes in error/notice fields")
    return fields


def parse_parameter_status(buf: bytes, start: int, end: int) -> tuple[str, str]:
    """ParameterStatus ('S') → (name, value)."""
    name, pos = _cstr(buf, start + 5, end)
    value, pos = _cstr(buf, pos, end)
    if pos != end:
        raise ProtocolError("trailing bytes in ParameterStatus")
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_auth_code(buf: bytes, start: int, end: int) -> int:
    if end - start < 9:
        raise ProtocolError("truncated Authentication message")
    return int.from_bytes(buf[start + 5 : start + 9], "big")


def parse_sasl_mechanisms(buf: bytes, start: int, end: int) -> list[bytes]:
    """AuthenticationSASL (code 10): a NUL-separated list ending in an empty name."""
    mechs: list[bytes] = []
    pos = start + 9
    while pos < end and buf[pos] != 0:
        name, pos = _cstr(buf, pos, end)
        mechs.append(name)
    if pos != end - 1:  # also catches a message too short for the code (pos > end)
        raise ProtocolError("unterminated or trailing bytes in AuthenticationSASL")
    return mechs


# -- builders -----------------------------------------------------------------------------------


def _msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def _fields(severity: str, sqlstate: str, message: str, detail: str | None,
            hint: str | None, localized: str | None) -> bytes:
    parts = [b"S" + (localized or severity).encode() + b"\0",
             b"V" + severity.encode() + b"\0",
             b"C" + sqlstate.encode() + b"\0",
             b"M" + message.encode() + b"\0"]
    if detail:
        parts.append(b"D" + detail.encode() + b"\0")
    if hint:
        parts.append(b"H" + hint.encode() + b"\0")
    return b"".join(parts) + b"\0"


def error_response(sqlstate: str, message: str, *, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    return _msg(b"E", _fields(severity, sqlstate, message, detail, hint, None))


def notice_response(sqlstate: str, message: str, *, severity: str = "NOTICE",
                    detail: str | None = None, hint: str | None = None) -> bytes:
    return _msg(b"N", _fields(severity, sqlstate, message, detail, hint, None))


def ready_for_query(status: bytes = b"I") -> bytes:
    return _msg(b"Z", status)


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return _msg(b"K", struct.pack("!i", pid) + secret)


def parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def negotiate_protocol_version(minor: int, unsupported: Sequence[str]) -> bytes:
    body = struct.pack("!ii", minor, len(unsupported))
    body += b"".join(n.encode() + b"\0" for n in unsupported)
    return _msg(b"v", body)


def authentication_sasl(mechanisms: Iterable[bytes]) -> bytes:
    return _msg(b"R", struct.pack("!i", 10) + b"".join(m + b"\0" for m in mechanisms) + b"\0")


def row_description(names: Sequence[str]) -> bytes:
    """Text columns of type text (OID 25)."""
    body = struct.pack("!h", len(names))
    for n in names:
        body += n.encode() + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return _msg(b"T", body)


def data_row(values: Sequence[str | None]) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            body += struct.pack("!i", -1)
        else:
            b = v.encode()
            body += struct.pack("!i", len(b)) + b
    return _msg(b"D", body)


def command_complete(tag: str) -> bytes:
    return _msg(b"C", tag.encode() + b"\0")


def query(sql: str | bytes) -> bytes:
    text = sql.encode() if isinstance(sql, str) else sql
    return _msg(b"Q", text + b"\0")


def parse(name: bytes, sql: str | bytes, param_types: Sequence[int] = ()) -> bytes:
    text = sql.encode() if isinstance(sql, str) else sql
    # Int16 count and Int32 type OIDs, both read unsigned by PostgreSQL (OIDs go up to 2^32-1).
    body = name + b"\0" + text + b"\0" + struct.pack("!H", len(param_types))
    body += b"".join(struct.pack("!I", t) for t in param_types)
    return _msg(b"P", body)


def execute(portal: bytes, max_rows: int = 0) -> bytes:
    return _msg(b"E", portal + b"\0" + struct.pack("!i", max_rows))


def sync() -> bytes:
    return b"S\0\0\0\x04"


def terminate() -> bytes:
    return b"X\0\0\0\x04"


def flush() -> bytes:
    return b"H\0\0\0\x04"
