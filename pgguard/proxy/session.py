"""One client session: startup, authentication relay, then the message relay (DESIGN §3).

The relay runs on asyncio.Protocol callbacks. Each direction has a `Framer` (protocol/framing.py)
that forwards bytes in bulk and calls back only for the messages we must see:

    client → server   Query, Parse, Bind (head), Execute, Describe, Close, Sync, FunctionCall,
                      CopyDone/CopyFail, Terminate: to keep the reply FIFO and to decide
    server → client   everything but DataRow, CopyData, NoticeResponse and Notification;
                      once ready, after the bytes are written to the client (but ErrorResponse)

The usual prepared-statement round trip (Bind, Describe, Execute, Sync in one read, and its reply
in one read) is recognised by the session itself and booked in one step, as those callbacks
would book it (`_fast_request`, `_fast_reply`); anything else goes through the framer.

The reply FIFO (`_fifo`) holds one entry per forwarded message that expects a reply, in order;
server replies pop it (PROTOCOL §1.3). An entry is a kind (an int, the frontend type byte), or a
`_Marked` entry when the message was replaced by a poison whose ErrorResponse must be swapped
for pgguard's own (PROTOCOL §3).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import secrets
import string
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import structlog

from pgguard.classify import ChangeKind, Classification, SessionFacts, StatementClass
from pgguard.errors import ClientRefused, ProtocolError, SqlState, StateUnavailable, UpstreamError
from pgguard.protocol import messages as m
from pgguard.protocol.framing import (
    FORWARD,
    HOLD,
    INSPECT,
    INVALID,
    LATER,
    FrameHandler,
    Framer,
    frame_table,
)
from pgguard.protocol.framing import (
    Verdict as FrameVerdict,
)
from pgguard.proxy._clock import monotonic
from pgguard.proxy._io import send_some
from pgguard.proxy.guard import Allow, NeedStepUp, Refuse, Verdict
from pgguard.proxy.holds import HoldOutcome, hold_hint
from pgguard.proxy.startup import check_startup

if TYPE_CHECKING:
    from pgguard.proxy.server import ProxyContext

log = structlog.get_logger("pgguard.session")

__all__ = ["Session", "fatal_shutdown", "new_session_id"]

# Frontend: what to look at. Anything not listed is not a frontend message type: 08P01.
CLIENT_TABLE = frame_table(INVALID, inspect="QPESHCDFXcf", head="B", skip="dp")
# Backend: stream the bulky and the asynchronous ones, look at the rest. Once the session is
# ready, only an ErrorResponse may be replaced (PROTOCOL §3): the rest is bookkeeping, done after
# the reply has been written to the client (LATER), but a ParameterStatus, rare by then, is
# checked before it is forwarded (a malformed one ends the session without reaching the client).
SERVER_TABLE = frame_table(INSPECT, skip="DdNA")
SERVER_READY_TABLE = frame_table(LATER, skip="DdNA", inspect="ES")

# FIFO kinds (frontend type bytes).
K_QUERY, K_PARSE, K_BIND, K_EXEC, K_SYNC, K_CLOSE = (ord(c) for c in "QPBESC")
K_DESCRIBE_S, K_DESCRIBE_P = 1, 2

POISON_SQL = b"PGGUARD_REJECTED_STATEMENT"
POISON_PORTAL = b"\x01pgguard_reject"

STARTUP, CONNECTING, AUTH, READY, CLOSED = range(5)
# Compiled, the states and the FIFO kinds are C constants (session.pxd), not module attributes;
# the states by name, for tests and benchmarks:
STATES = {"startup": STARTUP, "connecting": CONNECTING, "auth": AUTH, "ready": READY,
          "closed": CLOSED}
_BYTES = tuple(bytes((i,)) for i in range(256))  # a byte as a bytes object, without slicing

# Client encodings pgguard can decode SQL in (PostgreSQL name → Python codec).
ENCODINGS = {
    "UTF8": "utf-8", "SQL_ASCII": "latin-1", "LATIN1": "latin-1", "LATIN2": "iso8859-2",
    "LATIN9": "iso8859-15", "WIN1252": "cp1252", "WIN1251": "cp1251", "KOI8R": "koi8-r",
    "EUC_JP": "euc_jp", "EUC_KR": "euc_kr",
}
# Deliberately absent: SJIS, BIG5, GBK, UHC, GB18030, JOHAB. Their second bytes can be ASCII
# (a backslash or a quote), so pgguard and the server could disagree on where a string ends;
# PostgreSQL refuses them as server encodings for that reason. Text in them is unknown.

# A SET/RESET (tx or admin: SET, RESET, set_config()) that may change how later messages are
# decoded or lexed.
_SETTING_CLASSES = frozenset({StatementClass.TX, StatementClass.ADMIN})
_ENCODING_SETTING = re.compile(
    r"client_encoding|\bnames\b|\breset\s+all\b|standard_conforming_strings", re.I)

_ID_ALPHABET = string.ascii_lowercase + string.digits

# Classes whose statements are refused when the audit trail cannot be written (fail closed).
SENSITIVE = frozenset({StatementClass.WRITE, StatementClass.DDL, StatementClass.ADMIN,
                       StatementClass.PII, StatementClass.UNKNOWN})

# While a statement is held, the client's later messages wait in the framer; past this many
# bytes we stop reading the client socket (DESIGN §3: bounded hold queue).
HOLD_BACKLOG_BYTES = 1 << 20

# `SHOW pgguard.session_id` / `SHOW pgguard.status`, answered in-band by substitution.
_SHOW_PGGUARD = re.compile(rb"\A\s*show\s+pgguard\.(session_id|status)\s*;?\s*\Z", re.I)

_UNKNOWN_STATEMENT = Classification(
    classes=frozenset({StatementClass.UNKNOWN}), statements=(),
    reason="Bind names a prepared statement pgguard has not seen")
_UNKNOWN_PORTAL = Classification(
    classes=frozenset({StatementClass.UNKNOWN}), statements=(),
    reason="Execute names a portal pgguard has not seen bound or declared")
_UNDECODABLE = Classification(
    classes=frozenset({StatementClass.UNKNOWN}), statements=(),
    redacted_sql="<undecodable>", reason="the statement is not valid in the client encoding")


def _nothing_buffered() -> int:
    return 0


def _not_connected(data: bytes) -> None:
    raise RuntimeError("no transport to write to")


# The transports whose socket a reply may be sent to directly (_direct_fd): the plain TCP and
# Unix socket transports of uvloop and asyncio. Never a TLS one (its socket carries records).
_DIRECT_TRANSPORTS = frozenset({"TCPTransport", "UnixTransport", "_SelectorSocketTransport"})


def _direct_fd(transport: asyncio.BaseTransport) -> int:
    """A duplicate of the transport's socket, for `_send`, or -1 (TLS, another kind of
    transport, no socket, no descriptor left). The session's own descriptor: should the
    transport close its own while the session still looks at this one, it is still the same
    connection (never a number the kernel has given to another), until Session.close()."""
    if (type(transport).__name__ not in _DIRECT_TRANSPORTS
            or transport.get_extra_info("ssl_object") is not None):
        return -1
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    try:
        fd = os.dup(sock.fileno())
    except (OSError, ValueError):
        return -1
    # Descriptors are numbered lowest first: a high one means few are left. They are for
    # connections then (a quarter of the limit stays free), this session sends as before.
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if 0 < limit != resource.RLIM_INFINITY and fd >= limit - max(64, limit // 4):
        _close_fd(fd)
        return -1
    return fd


def _close_fd(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _send(fd: int, data: bytes, buffered: Callable[[], int] | None,
          write: Callable[[bytes], object]) -> bool:
    """Write `data` to a peer: straight to its socket (`fd`, from _direct_fd) when nothing waits
    in its transport, which is the usual case: one send() call instead of the transport's
    write() layers. What the socket does not take now goes to the transport, `write`: from then
    on everything does, until its buffer (`buffered`) is empty again, so the order holds and
    the transport's flow control (pause_writing) works as it always does. fd -1: the
    transport alone. `buffered` None: nothing has gone through the transport since its buffer
    was last seen empty (the caller knows: this returns True when something did, and the
    session's other writes to a transport say so too), so there is nothing to ask it.
    Returns whether any of `data` went to the transport."""
    if fd >= 0 and (buffered is None or not buffered()):
        n = send_some(fd, data)
        if n == len(data):
            return False
        if n > 0:
            data = data[n:]
    write(data)
    return True


def new_session_id() -> str:
    """12 characters of [a-z0-9]: 62 bits of randomness (DESIGN §6)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


class _Fifo:
    """The reply FIFO: a list and the index of its first entry. Compiled, its methods are C
    calls (a deque's are looked up by name), and the list is reused once it empties, as it
    does at every ReadyForQuery."""

    __slots__ = ("_end", "_first", "_items")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._first = 0  # the first entry; entries are _items[_first:_end]
        self._end = 0

    def append(self, e: Any) -> None:
        items = self._items
        if self._end < len(items):
            items[self._end] = e
        else:
            if self._first:  # reuse the front before the list grows
                del items[:self._first]
                self._end -= self._first
                self._first = 0
            items.append(e)
        self._end += 1

    def appendleft(self, e: Any) -> None:
        if self._first:
            self._first -= 1
            self._items[self._first] = e
        else:
            self._items.insert(0, e)
            self._end += 1

    def head(self) -> Any:
        if self._first >= self._end:
            raise IndexError("the FIFO is empty")
        return self._items[self._first]

    def popleft(self) -> Any:
        first = self._first
        if first >= self._end:
            raise IndexError("the FIFO is empty")
        e = self._items[first]
        self._items[first] = None
        first += 1
        if first == self._end:
            first = self._end = 0
        self._first = first
        return e

    def clear(self) -> None:
        self._items = []
        self._first = self._end = 0

    def nonempty(self) -> bool:
        """bool(fifo), as a C call when compiled (bool() goes through the type's slot)."""
        return self._end > self._first

    def __len__(self) -> int:
        return self._end - self._first

    def __bool__(self) -> bool:
        return self._end > self._first

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items[self._first:self._end])


class _Allowed:
    """A verdict that depends on nothing but the classification (no grant, no clock), made
    under the policy of `epoch`: repeated statements of that classification skip the policy
    until it changes (`Session._decide`)."""

    __slots__ = ("classification", "epoch", "family", "plain", "rule", "sensitive", "tally")

    def __init__(self, classification: Classification, epoch: int, rule: str | None,
                 tally: Any, family: tuple[bytes, ...] | None) -> None:
        self.classification = classification
        self.epoch = epoch
        self.rule = rule
        # The audit template of these statements' usual event (AuditSink.usual_template).
        self.family = family
        self.sensitive = not SENSITIVE.isdisjoint(classification.classes)
        # The statements_total child to bump (None: report through ctx.on_statement).
        self.tally = tally
        # Nothing for _forwarded to record: no session change, no SET that may change how
        # later messages are decoded.
        self.plain = (not classification.session_changes
                      and _SETTING_CLASSES.isdisjoint(classification.classes))


class _Entry:
    """A FIFO entry: a message that expects a reply, by kind (its frontend type byte, or
    K_DESCRIBE_S/P). The subclasses carry what the reply is needed for; a message that needs
    nothing more has the one shared entry of its kind (`_E_*`). Compiled, `kind` is a C field
    of every entry."""

    __slots__ = ("kind",)

    def __init__(self, kind: int) -> None:
        self.kind = kind


class _Marked(_Entry):
    """A message replaced by a poison: its ErrorResponse is swapped for pgguard's `error`."""

    __slots__ = ("error",)

    def __init__(self, kind: int, error: bytes) -> None:
        self.kind = kind
        self.error = error  # the complete ErrorResponse that replaces the server's


class _Tracked(_Entry):
    """A statement forwarded after a decision: completed (or failed) when its reply pops it,
    for the audit's `statement` event (duration, rows) and pgguard_statement_seconds."""

    __slots__ = ("classification", "decision", "ended", "error", "family", "resets_encoding",
                 "rows", "rule", "started", "stepup_event")

    kind: int
    classification: Classification
    decision: str  # allowed | released
    rule: str | None
    stepup_event: object | None
    started: float  # time.monotonic() when forwarded; then its duration, once done
    ended: float  # time.monotonic() when done (the audit's ts), -1.0 before
    rows: int | None
    error: str | None  # SQLSTATE of the server's error, if any
    resets_encoding: bool  # a SET that may change client_encoding / scs
    family: tuple[bytes, ...] | None  # its usual audit event's template (_Allowed.family)


def _track(t: _Tracked | None, kind: int, c: Classification, decision: str, rule: str | None,
           stepup_event: object | None) -> _Tracked:
    """A _Tracked, started now: `t` (one reported already, reused: see _report_done) or a new
    one. (Made with __new__ and set field by field: compiled, that is a few C stores, where
    calling the class would parse its arguments.)"""
    if t is None:
        t = _Tracked.__new__(_Tracked)
    t.kind = kind
    t.classification = c
    t.decision = decision
    t.rule = rule
    t.stepup_event = stepup_event
    t.started = monotonic()
    t.ended = -1.0
    t.rows = None
    t.error = None
    t.resets_encoding = False
    t.family = None
    return t


class _ParseEntry(_Entry):
    """A forwarded Parse: if the server refuses or skips it, its name is forgotten."""

    __slots__ = ("name",)

    def __init__(self, kind: int, name: bytes) -> None:
        self.kind = kind
        self.name = name


# The entries of the messages that need nothing but their kind.
_E_QUERY, _E_BIND, _E_EXEC, _E_SYNC, _E_CLOSE, _E_DESCRIBE_S, _E_DESCRIBE_P = (
    _Entry(k) for k in (K_QUERY, K_BIND, K_EXEC, K_SYNC, K_CLOSE, K_DESCRIBE_S, K_DESCRIBE_P))


class _Frames(FrameHandler):
    """One side's messages, to the session (compiled: a C call with C integers)."""

    __slots__ = ("server", "session")

    def __init__(self, session: Session, server: bool) -> None:
        self.session = session
        self.server = server

    def on_frame(self, typ: int, buf: bytes, start: int, end: int) -> FrameVerdict:
        if self.server:
            return self.session._on_server_frame(typ, buf, start, end)
        return self.session._on_client_frame(typ, buf, start, end)


def _tag_rows(buf: bytes, start: int, end: int) -> int | None:
    """Rows from a CommandComplete tag (`SELECT 5`, `INSERT 0 3`, `UPDATE 2`, `COPY 10`): its
    last word, if that is all ASCII digits. Scanned by index: compiled, a C loop."""
    first = start + 5
    i = end - 2  # the tag's last byte (before its NUL)
    rows = 0
    scale = 1
    while i >= first:
        ch = buf[i]
        if ch == 0x20:
            break
        if ch < 0x30 or ch > 0x39:
            return None
        if scale > 10**17:  # past 18 digits: Python's int (no server sends that many rows)
            last = buf[first : end - 1].rpartition(b" ")[2]
            return int(last) if last.isdigit() else None
        rows += (ch - 0x30) * scale
        scale *= 10
        i -= 1
    return rows if i < end - 2 else None


def _string_end(buf: bytes, i: int, end: int) -> int:
    """The index of the NUL that ends the string starting at `i`, or -1 if none before `end`.
    A loop by index rather than bytes.find: compiled, a C loop (names are short, and a Bind's
    head, where they are, is at most 4 KiB)."""
    while i < end:
        if buf[i] == 0:
            return i
        i += 1
    return -1


def _same_name(buf: bytes, start: int, end: int, name: bytes) -> bool:
    """Whether buf[start:end] is `name`, compared by index: compiled, a C loop and no slice."""
    if end - start != len(name):
        return False
    i = 0
    while start < end:
        if buf[start] != name[i]:
            return False
        start += 1
        i += 1
    return True


def _length(buf: bytes, pos: int) -> int:
    """The message length at buf[pos:pos + 4]: an int32, signed as PostgreSQL reads it (the
    framer's arithmetic: compiled, no step overflows a C integer)."""
    return (((buf[pos] ^ 0x80) - 0x80) * 0x1000000
            + (buf[pos + 1] << 16 | buf[pos + 2] << 8 | buf[pos + 3]))


class _Side:
    """Transport callbacks of one direction (an asyncio protocol), delegated to the session.
    Compiled, its data callbacks are C calls into the session."""

    __slots__ = ("_client", "_s")

    def __init__(self, session: Session, client: bool) -> None:
        self._s = session
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._client:
            self._s.client_connected(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._client:
            self._s.client_data(data)
        else:
            self._s.server_data(data)

    def eof_received(self) -> bool | None:
        self._s.no_direct_sends(self._client)  # the transport closes its socket now
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client:
            self._s.client_lost(exc)
        else:
            self._s.server_lost(exc)

    def pause_writing(self) -> None:
        self._s.set_read_pause(not self._client, 1, True)

    def resume_writing(self) -> None:
        self._s.set_read_pause(not self._client, 1, False)


class Session:
    def __init__(self, ctx: ProxyContext, client_addr: str, tls: bool) -> None:
        self.ctx = ctx
        self.id = new_session_id()
        self.client_addr = client_addr
        self.tls = tls
        self.user = ""
        self.database = ""
        self.state = STARTUP
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        # Their write and get_write_buffer_size methods, bound when each is set, and the
        # session's duplicate of each one's socket or -1 (the relay writes with them: _send).
        self._write_client: Callable[[bytes], object] = _not_connected
        self._write_server: Callable[[bytes], object] = _not_connected
        self._client_buffered: Callable[[], int] = _nothing_buffered
        self._server_buffered: Callable[[], int] = _nothing_buffered
        self._client_fd = -1
        self._server_fd = -1
        # Whether bytes may wait in that side's transport: something went through it since
        # its buffer was last seen empty (see _send). Every write to a transport sets it.
        self._client_queued = False
        self._server_queued = False
        self.txn_status = b"I"
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._startup_buf = b""
        # Set by refuse_at_startup(): the FATAL that answers the client's first packet.
        self._refusal: ClientRefused | None = None
        self._pending_client = b""
        self._client_minor = 0
        self._owe_negotiate = False
        self._password_exchanged = False
        self._real_key: tuple[int, bytes] | None = None
        self._our_pid: int | None = None
        self._params: dict[str, str] = {}
        self._encoding = "utf-8"
        self._fifo = _Fifo()  # of _Entry
        self._done = _Fifo()  # of _Tracked: answered, not yet reported (see _finished)
        self._spare: _Tracked | None = None  # one reported, for the next (_report_done)
        # Where an answered statement is reported (set by app.py before sessions start): the
        # pgguard_statement_seconds histogram and the audit sink; None: not reported.
        self._histogram = ctx.statement_seconds
        self._audit = ctx.audit_sink
        # prepared statement name → (SQL text or None, its classification)
        self._statements: dict[bytes, tuple[str | None, Classification]] = {}
        # The classifier epoch (rules, catalog) the statements were classified under, and the
        # names not classified again since it changed.
        self._stmt_epoch: tuple[str, str] | None = None
        self._stale: set[bytes] = set()
        # portal → (SQL text, classification) of the statement it was bound to: a snapshot, so
        # re-parsing the statement name later cannot change what the portal is decided on.
        # The unnamed portal, which most clients use for every statement, is kept in two
        # fields instead (no dict or set operation per statement): its snapshot (None: none
        # bound) and whether its first Execute was forwarded.
        self._portals: dict[bytes, tuple[str | None, Classification]] = {}
        self._running: set[bytes] = set()  # portals whose first Execute was forwarded
        self._unnamed: tuple[str | None, Classification] | None = None
        self._unnamed_running = False
        self._bind_name = b""  # the statement name of the last Bind (only saves a slice)
        # Verdicts that depend on nothing but the classification, by the id of the (cached,
        # shared) Classification object.
        self._allowed: dict[int, _Allowed] = {}
        self._last_allowed: _Allowed | None = None  # the one used last (checked as above)
        # While a forwarded SET/RESET may change client_encoding or standard_conforming_strings,
        # the later messages are classified as if the worst applied (unknown encoding,
        # backslashes unknown) until the server reports the values or the SET's reply arrives.
        self._enc_saved: str | None = None
        self._scs_saved: bool | None = None
        self._settle_at_z = False
        self._facts = SessionFacts()
        # The statement being held: (FIFO kind, classification, verdict); its hold task.
        self._held: tuple[int, Classification, NeedStepUp, str | None, bytes | None] | None = None
        self._hold_task: asyncio.Task[None] | None = None
        # A long statement being classified in a worker: (kind, text, parse?, statement name).
        self._offload: tuple[int, str | None, bool, bytes] | None = None
        self._offload_task: asyncio.Task[None] | None = None
        self._cache = ctx.classifier
        self._epoch_cell: list[Any] = self._cache.epoch_cell  # its epoch, read at every Bind
        self._guard_epoch: list[int] = ctx.guard_epoch_cell  # read at every decision
        self._client_copy_open = False
        self._paused = [0, 0]  # read-pause reasons, [client, server] (bit 1: peer buffer full)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shutting_down = False
        self._startup_timer: asyncio.TimerHandle | None = None
        self._cframer = Framer(CLIENT_TABLE, _Frames(self, server=False),
                               max_len=ctx.config.limits.max_message_bytes)
        self._sframer = Framer(SERVER_TABLE, _Frames(self, server=True))

    # -- lifecycle ----------------------------------------------------------------------------

    def client_connected(self, transport: asyncio.Transport) -> None:
        if self.state == CLOSED:  # closed (shutdown) while its handshake finished
            transport.close()
            return
        self.client = transport
        self._write_client = transport.write  # per reply: not looked up by name each time
        self._client_buffered = transport.get_write_buffer_size
        self._client_fd = _direct_fd(transport)
        loop = asyncio.get_running_loop()
        self._startup_timer = loop.call_later(self.ctx.config.limits.startup_timeout,
                                              self._startup_timed_out)

    def refuse_at_startup(self, refusal: ClientRefused) -> None:
        """Answer the client's first packet with this FATAL and close. For a refusal decided
        as the TLS handshake ends (direct TLS without ALPN): by the time the client sends a
        packet, its side of the handshake is over and everything it sent has been read, so
        the close cannot turn into a reset that loses the FATAL (as closing at once could,
        with the client's last handshake message still unread)."""
        self._refusal = refusal

    def _startup_timed_out(self) -> None:
        if self.state < READY:
            log.info("session.startup_timeout", session=self.id, client=self.client_addr)
            refusal = self._refusal or ClientRefused(SqlState.PROTOCOL_VIOLATION,
                                                     "pgguard: startup did not finish in time")
            self.close(m.error_response(refusal.sqlstate, refusal.message, severity="FATAL",
                                        hint=refusal.hint))

    def close(self, fatal: bytes | None = None) -> None:
        """End the session: at most one FATAL to the client, Terminate to the server."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self._startup_timer is not None:
            self._startup_timer.cancel()
        if self.client is not None and not self.client.is_closing():
            if fatal:
                self.client.write(fatal)
            self.client.close()
        if self.server is not None and not self.server.is_closing():
            with contextlib.suppress(Exception):
                self.server.write(m.terminate())
            self.server.close()
        fds = self._client_fd, self._server_fd
        self._client_fd = self._server_fd = -1  # nothing is sent to them any more
        for fd in fds:
            _close_fd(fd)
        if self._our_pid is not None:
            self.ctx.cancels.release(self._our_pid)
        self.ctx.holds.end(self.id, HoldOutcome.SHUTDOWN if self._shutting_down
                           else HoldOutcome.DISCONNECT)
        for e in self._fifo:  # statements the server never finished answering
            if type(e) is _Tracked:
                e.error = e.error or "08006"
                self._finished(e)
        self._fifo.clear()
        self._report_done()
        for t in self._tasks:
            t.cancel()
        if not self.done.done():
            self.done.set_result(None)
        self.ctx.session_closed(self)

    def no_direct_sends(self, client_side: bool) -> None:
        """From now on the transport of that side alone writes to it (_send)."""
        if client_side:
            fd, self._client_fd = self._client_fd, -1
        else:
            fd, self._server_fd = self._server_fd, -1
        _close_fd(fd)

    def client_lost(self, exc: Exception | None) -> None:
        self.client = None if self.client is None else self.client
        self.close()

    def server_lost(self, exc: Exception | None) -> None:
        # Whatever the server said last (often a FATAL) has been relayed; add nothing.
        self.close()

    def begin_shutdown(self) -> None:
        self._shutting_down = True
        if self.state < READY or self._idle():
            self.close(fatal_shutdown())

    def _idle(self) -> bool:
        return (self.state == READY and not self._fifo and self.txn_status == b"I"
                and self._cframer.idle and self._held is None and self._offload is None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def set_read_pause(self, client_side: bool, reason: int, on: bool) -> None:
        """Flow control: stop reading one side while the other side's write buffer is full."""
        idx = 0 if client_side else 1
        before = self._paused[idx]
        after = before | reason if on else before & ~reason
        self._paused[idx] = after
        transport = self.client if client_side else self.server
        if transport is None or transport.is_closing() or bool(before) == bool(after):
            return
        if after:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # -- client bytes -------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        try:
            if self.state == READY and type(data) is bytes and self._fast_request(data):
                if self.server is not None:
                    self._server_queued = _send(
                        self._server_fd, data,
                        self._server_buffered if self._server_queued else None,
                        self._write_server)
            elif self.state >= AUTH:
                out = self._cframer.relay(data)
                if out is not None and self.server is not None:
                    if isinstance(out, bytes):  # the common case: one slice, one write
                        self._server_queued = _send(
                            self._server_fd, out,
                            self._server_buffered if self._server_queued else None,
                            self._write_server)
                    else:
                        self.server.writelines(out)
                        self._server_queued = True
                if self._cframer._held:  # Framer.holding, read as a C field when compiled
                    self._holding()
            elif self.state == STARTUP:
                self._startup_data(data)
            else:  # CONNECTING: keep until the upstream is there
                self._pending_client += data
        except ProtocolError as exc:
            log.info("session.protocol_error", session=self.id, error=str(exc))
            self.close(m.error_response(SqlState.PROTOCOL_VIOLATION,
                                        f"pgguard: invalid message: {exc}", severity="FATAL"))
        except ClientRefused as exc:
            self.close(m.error_response(exc.sqlstate, exc.message, severity="FATAL",
                                        hint=exc.hint))
        except Exception:  # one logged catch-all per connection
            log.exception("session.bug", session=self.id)
            self.close(m.error_response(SqlState.INTERNAL_ERROR, "pgguard: internal error",
                                        severity="FATAL"))

    def _startup_data(self, data: bytes) -> None:
        buf = self._startup_buf + data
        try:
            length = m.startup_packet_length(buf)
        except ProtocolError:
            if self._refusal is not None:
                raise self._refusal from None
            raise
        if length is None or len(buf) < length:
            self._startup_buf = buf
            return
        if self._refusal is not None:
            raise self._refusal
        packet, rest = buf[:length], buf[length:]
        self._startup_buf = b""
        msg = m.parse_startup_packet(packet)
        if isinstance(msg, m.CancelRequest):
            self.ctx.handle_cancel(msg)
            self.close()
            return
        if not isinstance(msg, m.StartupMessage):
            raise ProtocolError("unexpected encryption request")
        if self.ctx.config.tls.mode == "require" and not self.tls:
            raise ClientRefused(SqlState.INVALID_AUTHORIZATION,
                                "pgguard: this server accepts TLS connections only")
        check_startup(msg.params, self.ctx.setting_is_harmless)
        self.user = msg.params["user"]
        self.database = msg.params.get("database") or self.user
        self._cache = self.ctx.cache_for(self.database)
        self._epoch_cell = self._cache.epoch_cell
        self._client_minor = msg.minor
        startup = msg.raw
        if msg.minor > m.NEWEST_MINOR:
            # Negotiate down as PostgreSQL does: ask upstream for our newest minor and tell the
            # client with NegotiateProtocolVersion unless the upstream says it first.
            startup = m.startup_message(msg.params, m.NEWEST_MINOR)
            self._owe_negotiate = True
        self._pending_client = rest
        self.state = CONNECTING
        self._spawn(self._connect_upstream(startup))

    async def _connect_upstream(self, startup: bytes) -> None:
        try:
            transport = await self.ctx.connect_upstream(
                lambda: cast(asyncio.Protocol, _Side(self, client=False)))
        except UpstreamError as exc:
            self.ctx.upstream_error(exc.kind)
            self.close(m.error_response(SqlState.CONNECTION_FAILURE,
                                        f"pgguard: cannot connect to the database server: {exc}",
                                        severity="FATAL"))
            return
        except Exception:
            log.exception("session.bug", session=self.id)
            self.close(m.error_response(SqlState.INTERNAL_ERROR, "pgguard: internal error",
                                        severity="FATAL"))
            return
        if self.state == CLOSED:
            transport.close()
            return
        self.server = transport
        self._write_server = transport.write
        self._server_buffered = transport.get_write_buffer_size
        self._server_fd = _direct_fd(transport)
        self.state = AUTH
        transport.write(startup)
        self._server_queued = True
        pending, self._pending_client = self._pending_client, b""
        if pending:
            self.client_data(pending)

    # -- the prepared-statement round trip in one step -----------------------------------------
    #
    # What prepared-statement clients send most (pgbench -M prepared and psycopg through libpq,
    # asyncpg, pgjdbc): one read holding Bind (unnamed portal), maybe Describe of that portal
    # (libpq sends one), Execute, Sync; answered by one read holding BindComplete, maybe
    # RowDescription or NoData, DataRows, CommandComplete, ReadyForQuery. When a read is
    # exactly that and everything it needs is known (the statement classified, its verdict a
    # cached allow under the policy in force, nothing buffered in the framer), the session
    # does in one step what the framer's callbacks would do message by message: the same FIFO
    # entries, the same decision and bookkeeping, the same bytes forwarded. Anything else, or
    # any doubt, returns False before changing anything, and the framer takes the read
    # (tests/unit/test_session_fastpath.py holds the two ways to the same results).

    def _fast_request(self, data: bytes) -> bool:
        framer = self._cframer
        if (framer._buf or framer._stream_left or framer._drop_left or framer._held
                or framer._later_end or self._client_copy_open):
            return False
        n = len(data)
        if n < 28 or data[0] != 0x42:  # the shortest Bind is 13 bytes, Execute 10, Sync 5
            return False
        length = _length(data, 1)
        e = 1 + length  # after the Bind
        # (A limit under 9 bytes would refuse the Execute: the framer's way, then.)
        if length < 4 or length > framer._max_len or framer._max_len < 9:
            return False
        described = n == e + 22  # 7 bytes more: Describe of the unnamed portal
        if described:
            if data[e] != 0x44 or _length(data, e + 1) != 6 or data[e + 5] != 0x50 \
                    or data[e + 6] != 0:
                return False
            e += 7
        elif n != e + 15:
            return False
        # Execute of the unnamed portal (any row limit), then Sync, and nothing after them.
        if (data[e] != 0x45 or _length(data, e + 1) != 9 or data[e + 5] != 0
                or data[e + 10] != 0x53 or _length(data, e + 11) != 4):
            return False
        if data[5] != 0:  # a named portal: the framer's way
            return False
        # The statement name, within the head the framer would show _on_client_frame.
        nul = _string_end(data, 6, min(1 + length, 5 + framer._head_bytes))
        if nul < 0:
            return False
        stmt = self._bind_name  # kept as _on_client_frame keeps it
        if not _same_name(data, 6, nul, stmt):
            stmt = self._bind_name = data[6:nul] if nul > 6 else b""
        prepared = self._statements.get(stmt)
        if (prepared is None or self._stmt_epoch is not self._epoch_cell[0]
                or (self._stale and stmt in self._stale)):  # to classify again (_reclassified)
            return False
        c = prepared[1]
        a = self._last_allowed  # the cached verdict, checked as _decide checks it
        if a is None or a.classification is not c:
            a = self._allowed.get(id(c))
        if (a is None or a.classification is not c or a.tally is None or not a.plain
                or a.epoch != self._guard_epoch[0]
                or (a.sensitive and not self.ctx.audit_healthy())):
            return False
        # Decided: what Bind, Describe, Execute (_decide, _forwarded) and Sync would record.
        self._unnamed = prepared
        self._unnamed_running = True
        a.tally.value += 1
        self._last_allowed = a
        t = _track(self._spare, K_EXEC, c, "allowed", a.rule, None)
        self._spare = None
        t.family = a.family
        fifo = self._fifo
        fifo.append(_E_BIND)
        if described:
            fifo.append(_E_DESCRIBE_P)
        fifo.append(t)
        fifo.append(_E_SYNC)
        return True

    def _fast_reply(self, data: bytes) -> bool:
        fifo = self._fifo
        first = fifo._first
        size = fifo._end - first
        if size != 3 and size != 4:
            return False
        items = fifo._items
        head = items[first + size - 2]
        if (items[first] is not _E_BIND or items[first + size - 1] is not _E_SYNC
                or type(head) is not _Tracked
                or (size == 4 and items[first + 1] is not _E_DESCRIBE_P)):
            return False
        t = head  # typed (session.pxd): its fields are C fields
        if t.kind != K_EXEC:
            return False
        framer = self._sframer
        if (framer._buf or framer._stream_left or framer._drop_left or framer._held
                or framer._later_end):
            return False
        n = len(data)
        if n < 17 or data[0] != 0x32 or _length(data, 1) != 4:  # BindComplete
            return False
        max_len = framer._max_len
        pos = 5
        if size == 4:  # the Describe's answer: RowDescription or NoData
            if pos + 5 > n or (data[pos] != 0x54 and data[pos] != 0x6E):
                return False
            length = _length(data, pos + 1)
            if length < 4 or length > max_len:
                return False
            pos += 1 + length
        while pos + 5 <= n and data[pos] == 0x44:  # DataRows
            length = _length(data, pos + 1)
            if length < 4 or length > max_len:
                return False
            pos += 1 + length
        if pos + 5 > n or data[pos] != 0x43:  # CommandComplete
            return False
        tag = pos
        length = _length(data, tag + 1)
        if length < 5 or length > max_len:
            return False
        z = tag + 1 + length  # ReadyForQuery, the last message
        if z + 6 != n or data[z] != 0x5A or _length(data, z + 1) != 5:
            return False
        if self.client is not None:
            self._client_queued = _send(
                self._client_fd, data, self._client_buffered if self._client_queued else None,
                self._write_client)
        # After the client has the reply, as the framer's LATER callbacks: BindComplete pops
        # the Bind, RowDescription or NoData the Describe, CommandComplete the Execute (with
        # its rows), ReadyForQuery the Sync.
        rows = _tag_rows(data, tag, z)
        if rows is not None:
            t.rows = rows if t.rows is None else rows + t.rows
        fifo.popleft()
        if size == 4:
            fifo.popleft()
        fifo.popleft()
        self._finished(t)
        fifo.popleft()
        self.txn_status = _BYTES[data[z + 5]]
        if self._settle_at_z:
            self._settle_at_z = False
            self._encoding_settled()
        if self._shutting_down and self.txn_status == b"I":
            asyncio.get_running_loop().call_soon(self._shutdown_if_idle)
        self._report_done()
        return True

    # -- client frames (framer callback) ------------------------------------------------------

    def _on_client_frame(self, typ: int, buf: bytes, start: int, end: int) -> FrameVerdict:
        fifo = self._fifo
        # The extended protocol's Bind / Execute / Sync come first: they are the hot path of
        # every prepared-statement client.
        if typ == 0x42:  # Bind (head): portal and statement names
            nul = _string_end(buf, start + 5, end)
            nul2 = _string_end(buf, nul + 1, end) if nul >= 0 else -1
            if nul2 < 0:
                raise ProtocolError("unterminated name in Bind")
            portal = buf[start + 5 : nul] if nul > start + 5 else b""
            # The name of the last Bind's statement, kept: clients bind the same one again and
            # again, and the kept object needs no slice and has its hash already.
            stmt = self._bind_name
            if not _same_name(buf, nul + 1, nul2, stmt):
                stmt = self._bind_name = buf[nul + 1 : nul2] if nul2 > nul + 1 else b""
            prepared = self._statements.get(stmt)
            if prepared is None:  # a statement of SQL PREPARE, or one we never saw
                prepared = (None, self._sql_prepared(stmt))
            elif (self._stmt_epoch is not self._epoch_cell[0]  # changes only with a reload
                  or (self._stale and stmt in self._stale)):  # not bound since the last one
                prepared = self._reclassified(stmt, prepared)
            if portal:
                self._portals[portal] = prepared
                self._running.discard(portal)
            else:
                self._unnamed = prepared
                self._unnamed_running = False
            fifo.append(_E_BIND)
        elif typ == 0x45:  # Execute: portal name, NUL, row limit (int32)
            nul = end - 5
            if nul < start + 5 or buf[nul] != 0:
                raise ProtocolError("malformed Execute")
            portal = buf[start + 5 : nul] if nul > start + 5 else b""
            if portal and b"\0" in portal:
                raise ProtocolError("malformed Execute")
            if not (portal in self._running if portal else self._unnamed_running):
                # (later Executes of a running portal continue)
                snap = self._portals.get(portal) if portal else self._unnamed
                if snap is None:
                    # Not bound by this client: a SQL cursor (DECLARE, or a refcursor a
                    # function returned). Decide on what we know of it, else as unknown.
                    return self._decide(K_EXEC, self._cursor(portal), None, portal)
                return self._decide(K_EXEC, snap[1], snap[0], portal)
            fifo.append(_E_EXEC)
        elif typ == 0x53:  # Sync
            if not self._client_copy_open:  # the server ignores Sync during COPY FROM STDIN
                fifo.append(_E_SYNC)
        elif typ == 0x51:  # Query
            sql = m.parse_query(buf, start, end)
            if _SHOW_PGGUARD.match(sql):
                fifo.append(_E_QUERY)
                return m.query(self._show_substitute(sql))
            text = self._decode(sql)
            c = self._classify(text, False)
            if c is None:
                self._offload = (K_QUERY, text, False, b"")
                return HOLD
            return self._decide(K_QUERY, c, text)
        elif typ == 0x50:  # Parse
            name, sql = m.parse_parse(buf, start, end)
            fifo.append(_ParseEntry(K_PARSE, name))
            if _SHOW_PGGUARD.match(sql):
                sub = self._show_substitute(sql)
                self._statements[name] = (sub.decode(), self.ctx.classifier.classify(
                    sub.decode(), self._facts, parse_message=True))
                return m.parse(name, sub)
            text = self._decode(sql)
            c = self._classify(text, True)
            if c is None:
                self._offload = (K_PARSE, text, True, name)
                return HOLD
            self._prepared(name, text, c)
        elif typ == 0x44:  # Describe: only the target kind matters (the server checks the rest)
            if end - start < 7:
                raise ProtocolError("truncated Describe")
            fifo.append(_E_DESCRIBE_S if buf[start + 5] == 0x53 else _E_DESCRIBE_P)
        elif typ == 0x43:  # Close
            kind, name = m.parse_named(buf, start, end)
            if kind == 0x53:
                self._statements.pop(name, None)
                self._facts.forget_prepared(name.decode("utf-8", "replace"))
            elif name:
                self._portals.pop(name, None)
                self._running.discard(name)
            else:
                self._unnamed = None
                self._unnamed_running = False
            fifo.append(_E_CLOSE)
        elif typ in (0x63, 0x66):  # CopyDone, CopyFail
            self._client_copy_open = False
        elif typ == 0x46:  # FunctionCall: calls a function by OID, no SQL to classify
            err = m.error_response(SqlState.INSUFFICIENT_PRIVILEGE,
                                   "pgguard: function calls by OID (fastpath) are not allowed")
            fifo.append(_Marked(K_QUERY, err))
            return m.query(POISON_SQL)
        elif typ == 0x58:  # Terminate
            self._shutting_down = True
        return FORWARD

    def _decode(self, sql: bytes) -> str | None:
        try:
            return sql.decode(self._encoding)
        except (UnicodeDecodeError, LookupError):
            return None

    def _classify(self, text: str | None, parse_message: bool) -> Classification | None:
        """None: classify it in a worker process (a long statement that is not cached)."""
        if text is None:
            return _UNDECODABLE
        return self.ctx.classify(text, self._facts, parse_message, self._cache)

    def _prepared(self, name: bytes, text: str | None, c: Classification) -> None:
        if not self._statements:
            self._stmt_epoch = self._cache.epoch
        self._statements[name] = (text, c)
        # Clients bind what they just parsed: the next Bind then finds this name as the one it
        # keeps (_bind_name), and the dict lookup its own key object (no bytes compare).
        self._bind_name = name
        self._stale.discard(name)
        if name:
            self._facts.record_prepared(name.decode("utf-8", "replace"), c.classes)

    def _reclassified(self, stmt: bytes,
                      prepared: tuple[str | None, Classification]) -> tuple[str | None,
                                                                          Classification]:
        """The rules or the catalog changed since this session's statements were classified:
        classify this one again before it is bound (in process: a reload is rare). Every
        statement prepared before the reload is stale until its next Bind, whichever is bound
        first (`_stale`, checked at each Bind while it is not empty)."""
        text = prepared[0]
        if self._stmt_epoch is not self._cache.epoch:  # as at Bind: a reload makes a new one
            self._stmt_epoch = self._cache.epoch
            self._stale = set(self._statements)
        if stmt in self._stale:
            self._stale.discard(stmt)
            if text is not None:  # (None: not decodable, unknown under any rules)
                prepared = (text, self._cache.classify(text, self._facts, parse_message=True))
                self._statements[stmt] = prepared
        return prepared

    async def _guarded(self, work: Any) -> None:
        """Run a hold or offload task; a bug in it ends this session (never the statement
        running unchecked, never a client left waiting forever)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session.bug", session=self.id)
            self.close(m.error_response(SqlState.INTERNAL_ERROR, "pgguard: internal error",
                                        severity="FATAL"))

    async def _run_offload(self) -> None:
        """Classify a long statement off the event loop, then decide as usual."""
        assert self._offload is not None
        kind, text, parse_message, name = self._offload
        assert text is not None
        c = await self.ctx.classify_offloaded(text, self._facts, parse_message, self._cache)
        self._offload = None
        self._offload_task = None
        if self.state != READY:
            return
        verdict: FrameVerdict
        if kind == K_PARSE:
            self._prepared(name, text, c)
            verdict = FORWARD
        else:
            verdict = self._decide(kind, c, text)
        if verdict is HOLD:  # it needs step-up: the framer keeps holding it
            self._holding()
            return
        out = self._cframer.resume(verdict)  # type: ignore[arg-type]
        if out and self.server is not None:
            self.server.writelines(out)
            self._server_queued = True
        self.set_read_pause(True, 2, False)
        if self._cframer.holding:
            self._holding()

    def _decide(self, kind: int, c: Classification, text: str | None,
                portal: bytes | None = None) -> FrameVerdict:
        """Ask the guard at a Query or a portal's first Execute; returns the framer verdict."""
        ctx = self.ctx
        a = self._last_allowed  # clients repeat one statement: no id(), no dict lookup then
        if a is None or a.classification is not c:
            a = self._allowed.get(id(c))
        if (a is not None and a.classification is c and a.epoch == self._guard_epoch[0]
                and (not a.sensitive or ctx.audit_healthy())):
            # The common case: a verdict that depends on nothing but the classification, made
            # under the policy in force, and the audit writable if the statement is sensitive.
            tally = a.tally
            if tally is not None:  # what on_statement does with an allowed statement: count it
                tally.value += 1
            else:
                ctx.on_statement(self, c, "allowed", a.rule)
            self._last_allowed = a
            self._forwarded(kind, c, "allowed", a.rule, None, text, portal, a)
            return FORWARD
        verdict: Verdict = ctx.guard.check(self, c, text)
        if type(verdict) is Allow and verdict.cacheable:
            if len(self._allowed) >= 1024:
                self._allowed.clear()
            sink = ctx.audit_sink
            self._allowed[id(c)] = self._last_allowed = _Allowed(
                c, self._guard_epoch[0], verdict.rule, ctx.allowed_tally(c.classes),
                None if sink is None else sink.usual_template(
                    self.id, self.user, self.client_addr, c, "allowed", verdict.rule))
        if not isinstance(verdict, Refuse):
            refusal = self._audit_refusal(c)
            if refusal is not None:
                verdict = refusal
        if isinstance(verdict, Refuse):
            self.ctx.on_statement(self, c, "denied", verdict.rule)
            self._refused(kind, m.error_response(
                verdict.sqlstate, verdict.message, detail=verdict.detail, hint=verdict.hint),
                portal)
            return _poison(kind)
        if isinstance(verdict, NeedStepUp):
            self._held = (kind, c, verdict, text, portal)
            return HOLD
        self.ctx.on_statement(self, c, "allowed", verdict.rule)
        self._forwarded(kind, c, "allowed", verdict.rule, None, text, portal, None)
        return FORWARD

    def _audit_refusal(self, c: Classification) -> Refuse | None:
        if c.classes & SENSITIVE and not self.ctx.audit_healthy():
            return Refuse(SqlState.IO_ERROR,
                          "pgguard: cannot write the audit trail; sensitive statement refused",
                          rule="audit.unwritable")
        return None

    def _refused(self, kind: int, error: bytes, portal: bytes | None) -> None:
        """The message is replaced by the poison; its ErrorResponse will be pgguard's."""
        self._fifo.append(_Marked(kind, error))
        if portal is not None:
            self._set_running(portal, False)  # its next Execute is decided again

    def _forwarded(self, kind: int, c: Classification, decision: str, rule: str | None,
                   stepup_event: object | None, text: str | None,
                   portal: bytes | None, allowed: _Allowed | None) -> None:
        """Bookkeeping for a decided message that goes to the server as it is; `allowed`: its
        cached verdict, if that decided it."""
        t = _track(self._spare, kind, c, decision, rule, stepup_event)
        self._spare = None
        if portal is not None:
            self._set_running(portal, True)
        if allowed is not None:
            t.family = allowed.family
            if allowed.plain:  # nothing to record (no session change, no SET)
                self._fifo.append(t)
                return
        if c.session_changes:
            self._session_changed(c)
        if (text is not None and not _SETTING_CLASSES.isdisjoint(c.classes)
                and _ENCODING_SETTING.search(text)):
            # Until the server has run it, later messages may be in another encoding or
            # quoting regime: classify them as if the worst applied (fail closed).
            t.resets_encoding = True
            if self._enc_saved is None:
                self._enc_saved = self._encoding
            if self._scs_saved is None:
                self._scs_saved = self._facts.standard_conforming_strings
            self._encoding = "unknown"
            self._facts.standard_conforming_strings = False
        self._fifo.append(t)

    def _set_running(self, portal: bytes, running: bool) -> None:
        """Whether the portal's first Execute was forwarded (then its next ones continue)."""
        if not portal:
            self._unnamed_running = running
        elif running:
            self._running.add(portal)
        else:
            self._running.discard(portal)

    def _sql_prepared(self, name: bytes) -> Classification:
        classes = self._facts.prepared.get(name.decode("utf-8", "replace"))
        if classes is None:
            return _UNKNOWN_STATEMENT
        return Classification(classes=classes, statements=())

    def _session_changed(self, c: Classification) -> None:
        """PREPARE/DECLARE/CLOSE/DEALLOCATE/DISCARD forwarded: record them. A statement name
        that SQL re-prepares or deallocates no longer means what its protocol Parse said, and
        a cursor declared again under an old name is a new portal to decide again."""
        for ch in c.session_changes:
            if ch.kind in (ChangeKind.PREPARE, ChangeKind.DEALLOCATE):
                if ch.name is None:
                    self._statements = {k: v for k, v in self._statements.items() if not k}
                else:
                    self._statements.pop(ch.name.encode("utf-8"), None)
            elif ch.kind is ChangeKind.DISCARD_ALL:
                self._statements = {k: v for k, v in self._statements.items() if not k}
        self._facts.apply(c.session_changes)
        self._running.clear()
        self._unnamed_running = False

    def _parse_failed(self, name: bytes) -> None:
        """The server refused or skipped this Parse: the name keeps whatever it meant before,
        which pgguard does not know any more. Forget it (a Bind to it is then unknown)."""
        self._statements.pop(name, None)
        if name:
            self._facts.forget_prepared(name.decode("utf-8", "replace"))

    def _cursor(self, portal: bytes) -> Classification:
        classes = self._facts.cursors.get(portal.decode("utf-8", "replace"))
        if classes is None:
            return _UNKNOWN_PORTAL
        return Classification(classes=classes, statements=())

    def _show_substitute(self, sql: bytes) -> bytes:
        """`SHOW pgguard.x` → a SELECT of a literal the server executes (DESIGN §3)."""
        match = _SHOW_PGGUARD.match(sql)
        assert match is not None
        what = match.group(1).decode().lower()
        value = self.id if what == "session_id" else self.ctx.status_text(self)
        # Dollar quoting: no escape rules, whatever standard_conforming_strings says.
        tag = "$pgguard$"
        while tag in value:
            tag = f"$pgguard{secrets.token_hex(4)}$"
        return f"SELECT {tag}{value}{tag}::text AS \"pgguard.{what}\"".encode()

    # -- holds ----------------------------------------------------------------------------------

    def _holding(self) -> None:
        """The client framer stopped at a statement that needs step-up (or its backlog grew)."""
        self.set_read_pause(True, 2, self._cframer.backlog_size > HOLD_BACKLOG_BYTES)
        if self._offload is not None:
            if self._offload_task is None:
                self._offload_task = asyncio.get_running_loop().create_task(
                    self._guarded(self._run_offload()))
                self._tasks.add(self._offload_task)
            return
        if self._hold_task is None and self._held is not None:
            self._hold_task = asyncio.get_running_loop().create_task(
                self._guarded(self._run_hold()))
            self._tasks.add(self._hold_task)

    async def _run_hold(self) -> None:
        assert self._held is not None
        kind, c, need, text, portal = self._held
        ctx = self.ctx
        error: bytes | None = None
        outcome = HoldOutcome.RELEASED
        stepup_event: object | None = None
        try:
            enrolled = await ctx.is_enrolled(self.user)
        except StateUnavailable:
            enrolled = None
            error = m.error_response(
                SqlState.IO_ERROR, "pgguard: cannot verify step-up state; sensitive statement refused")
        if enrolled is False:
            error = m.error_response(
                SqlState.INSUFFICIENT_PRIVILEGE,
                f"pgguard: step-up required but {self.user} has no authenticator",
                hint=f"an administrator can run: pgguard enroll {self.user}")
        if error is None and self.state == READY:
            url = ctx.stepup_url(self.id)
            hold = ctx.holds.open(self.id, self.user, self.client_addr, need.classes, need.triggers)
            timeout = ctx.hold_timeout
            if self.client is not None:
                self.client.write(m.notice_response(
                    SqlState.WARNING,
                    f"pgguard: statement held: step-up required ({need.triggers})",
                    detail=f"session {self.id}, user {self.user}, waiting up to {timeout:g} s",
                    hint=hold_hint(self.id, url)))
                self._client_queued = True
            ctx.on_statement(self, c, "held", need.rule)
            if self.server is not None:
                # Replies to the messages before the held one stay in the server's send buffer
                # until a Flush or Sync, and the client's is queued behind the hold: send one
                # (it has no reply of its own, so the FIFO is unchanged).
                self.server.write(m.flush())
                self._server_queued = True
            outcome = await ctx.holds.wait(hold, timeout)
            stepup_event = hold.released_by
            if outcome is HoldOutcome.TIMEOUT:
                error = m.error_response(
                    SqlState.INSUFFICIENT_PRIVILEGE,
                    f"pgguard: step-up required; hold timed out after {timeout:g} s",
                    hint=hold_hint(self.id, url))
            elif outcome is HoldOutcome.CANCEL:
                error = m.error_response(SqlState.QUERY_CANCELED,
                                         "canceling statement due to user request")
            elif outcome is HoldOutcome.SHUTDOWN:
                self.close(fatal_shutdown())  # the held statement never ran
                return
            elif outcome is not HoldOutcome.RELEASED:
                return  # the session is ending
            else:
                error = self._recheck_release(c, text)
            refused_at_release = outcome is HoldOutcome.RELEASED and error is not None
            ctx.on_statement(self, c, "denied" if refused_at_release
                                  else _OUTCOME_DECISION[outcome], need.rule)
        elif error is not None:
            ctx.on_statement(self, c, "denied", need.rule)
        if self.state != READY:
            return
        self._held = None
        self._hold_task = None
        if error is None:
            self._forwarded(kind, c, "released", need.rule, stepup_event, text, portal, None)
            out = self._cframer.resume(None)
        else:
            self._refused(kind, error, portal)
            out = self._cframer.resume(_poison(kind))
        if out and self.server is not None:
            self.server.writelines(out)
            self._server_queued = True
        self.set_read_pause(True, 2, False)
        if self._cframer.holding:
            self._holding()

    def _recheck_release(self, c: Classification, text: str | None) -> bytes | None:
        """A released statement runs only if it still may: the policy may have been reloaded
        and the audit may have failed while it waited. (A step-up it still lacks is the one
        just made: a 0s class is satisfied by the fresh code.)"""
        verdict = self.ctx.guard.check(self, c, text)
        if not isinstance(verdict, Refuse):
            verdict = self._audit_refusal(c) or verdict
        if isinstance(verdict, Refuse):
            return m.error_response(verdict.sqlstate, verdict.message, detail=verdict.detail,
                                    hint=verdict.hint)
        return None

    # -- server bytes -------------------------------------------------------------------------

    def server_data(self, data: bytes) -> None:
        try:
            if self.state == READY and type(data) is bytes and self._fast_reply(data):
                return
            out = self._sframer.relay(data)
            if out is not None and self.client is not None:
                if isinstance(out, bytes):
                    self._client_queued = _send(
                        self._client_fd, out,
                        self._client_buffered if self._client_queued else None,
                        self._write_client)
                else:
                    self.client.writelines(out)
                    self._client_queued = True
            self._sframer.run_later()  # the FIFO, rows, status: after the client has the reply
            if self._done.nonempty():
                self._report_done()
        except ClientRefused as exc:
            self.close(m.error_response(exc.sqlstate, exc.message, severity="FATAL",
                                        hint=exc.hint))
        except ProtocolError as exc:
            log.warning("session.upstream_protocol_error", session=self.id, error=str(exc))
            self.ctx.upstream_error("reset")
            self.close(m.error_response(SqlState.PROTOCOL_VIOLATION,
                                        "pgguard: invalid message from the database server",
                                        severity="FATAL"))
        except Exception:
            log.exception("session.bug", session=self.id)
            self.close(m.error_response(SqlState.INTERNAL_ERROR, "pgguard: internal error",
                                        severity="FATAL"))

    def _on_server_frame(self, typ: int, buf: bytes, start: int, end: int) -> bytes | None:
        if self.state != READY:
            return self._on_server_startup_frame(typ, buf, start, end)
        fifo = self._fifo
        if typ == 0x5A:  # ReadyForQuery: pops through the Sync or Query it answers
            self.txn_status = _BYTES[buf[start + 5]]
            while fifo.nonempty():
                e = fifo.popleft()
                if type(e) is _Tracked:
                    self._finished(e)
                elif type(e) is _ParseEntry:  # answered by nothing but this Z: not parsed
                    p = e  # typed (session.pxd): a C field read
                    self._parse_failed(p.name)
                if e.kind == K_SYNC or e.kind == K_QUERY:
                    break
            if self._settle_at_z:
                self._settle_at_z = False
                self._encoding_settled()
            if self._shutting_down and not fifo.nonempty() and self.txn_status == b"I":
                asyncio.get_running_loop().call_soon(self._shutdown_if_idle)
            return FORWARD
        if not fifo.nonempty():
            if typ == 0x53:
                self._track_parameter(buf, start, end)
            return FORWARD
        head = fifo.head()
        hk = head.kind
        if typ in (0x31, 0x32, 0x33, 0x6E, 0x73):  # ParseComplete BindComplete CloseComplete NoData PortalSuspended
            if type(fifo.popleft()) is _Tracked:
                self._finished(head)
        elif typ == 0x43 or typ == 0x49:  # CommandComplete, EmptyQueryResponse
            if type(head) is _Tracked and typ == 0x43:
                t = head  # typed (session.pxd): its fields are C fields
                rows = _tag_rows(buf, start, end)
                if rows is not None:
                    t.rows = rows if t.rows is None else rows + t.rows
            if hk == K_EXEC:
                fifo.popleft()
                if type(head) is _Tracked:
                    self._finished(head)
        elif typ == 0x54:  # RowDescription
            if hk == K_DESCRIBE_S or hk == K_DESCRIBE_P:
                fifo.popleft()
        elif typ == 0x45:  # ErrorResponse
            replacement = None
            if type(head) is _Marked:
                marked = head  # typed (session.pxd): a C field read
                replacement = marked.error
            elif type(head) is _Tracked:
                t = head
                t.error = m.parse_fields(buf, start, end).get("C", "")
            if hk != K_QUERY:
                # Extended protocol: the server skips to Sync; drop what it will not answer.
                while fifo:
                    e = fifo.head()
                    if e.kind == K_SYNC:
                        break
                    fifo.popleft()
                    if type(e) is _Tracked:
                        self._finished(e)
                    elif type(e) is _ParseEntry:
                        p = e
                        self._parse_failed(p.name)
            self._client_copy_open = False
            return replacement
        elif typ == 0x47:  # CopyInResponse
            if hk == K_EXEC:
                # Syncs pipelined after this Execute reach the server in copy-in mode: ignored.
                keep = fifo.popleft()
                while fifo and fifo.head().kind == K_SYNC:
                    fifo.popleft()
                fifo.appendleft(keep)
            self._client_copy_open = True
        elif typ == 0x53:
            self._track_parameter(buf, start, end)
        return FORWARD

    def _encoding_settled(self) -> None:
        """The SET that could change the encoding has been answered: what the server did not
        report (with ParameterStatus) did not change."""
        if self._enc_saved is not None:
            self._encoding = self._enc_saved
            self._enc_saved = None
        if self._scs_saved is not None:
            self._facts.standard_conforming_strings = self._scs_saved
            self._scs_saved = None

    def _finished(self, t: _Tracked) -> None:
        """The server has answered `t`. Its duration is taken now; the audit event and the
        metrics are made once the reply has been written to the client (`_report_done`), so
        that bookkeeping is not in the client's round trip."""
        if t.resets_encoding:
            self._settle_at_z = True  # the server reports changed settings just before Z
        now = monotonic()
        t.started = now - t.started
        t.ended = now
        self._done.append(t)

    def _report_done(self) -> None:
        done, histogram, audit = self._done, self._histogram, self._audit
        try:
            while done.nonempty():
                t = done.popleft()
                if histogram is not None:
                    histogram.observe(t.started)
                if audit is not None:
                    if t.family is not None and t.rows is not None and t.error is None:
                        audit.emit_usual(t.family, t.started, t.rows, t.ended)  # its template
                    else:
                        audit.emit_statement(self.id, self.user, self.client_addr,
                                             t.classification, t.decision, t.rule, t.started,
                                             t.rows, t.error, t.stepup_event, t.ended)
                # Nothing refers to it now: the next statement's (_forwarded), not a new one.
                self._spare = t
        finally:
            if done.nonempty():  # only after an exception: the rest is not reported
                done.clear()

    def _on_server_startup_frame(self, typ: int, buf: bytes, start: int, end: int) -> bytes | None:
        if typ == 0x52:  # Authentication*
            code = m.parse_auth_code(buf, start, end)
            prefix = self._negotiate_prefix()
            if code == 0:
                if not self._password_exchanged and not self.ctx.config.allow_trust:
                    raise ClientRefused(
                        SqlState.INVALID_AUTHORIZATION,
                        f'pgguard: the database server let user "{self.user}" in without a '
                        "password; pgguard refuses trust authentication",
                        hint="require a password in pg_hba.conf for pgguard's address, "
                             "or set auth.allow_trust: true")
                return prefix + buf[start:end] if prefix else FORWARD
            if code in (3, 5):  # cleartext, MD5
                self._password_exchanged = True
            elif code == 10:  # SASL: never relay -PLUS (PROTOCOL §2)
                self._password_exchanged = True
                mechs = m.parse_sasl_mechanisms(buf, start, end)
                kept = [x for x in mechs if not x.endswith(b"-PLUS")]
                if not kept:
                    raise ClientRefused(SqlState.INVALID_AUTHORIZATION,
                                        "pgguard: the server offers only SASL channel binding, "
                                        "which cannot pass through a proxy")
                if kept != mechs or prefix:
                    return prefix + m.authentication_sasl(kept)
                return FORWARD
            elif code not in (11, 12):
                raise ClientRefused(SqlState.INVALID_AUTHORIZATION,
                                    f"pgguard: unsupported authentication method (code {code})")
            return prefix + buf[start:end] if prefix else FORWARD
        if typ == 0x76:  # NegotiateProtocolVersion from upstream: it speaks for us too
            self._owe_negotiate = False
            return FORWARD
        if typ == 0x4B:  # BackendKeyData: keep the real key, give the client ours
            self._real_key = (int.from_bytes(buf[start + 5 : start + 9], "big", signed=True),
                              bytes(buf[start + 9 : end]))
            return self._our_key_data(len(self._real_key[1]))
        if typ == 0x53:
            self._track_parameter(buf, start, end)
            return FORWARD
        if typ == 0x5A:
            prefix = b""
            if self._our_pid is None:  # upstream sent no BackendKeyData: issue ours anyway
                prefix = self._our_key_data(4 if self._client_minor < 2 else 32)
            self.state = READY
            self._sframer.set_table(SERVER_READY_TABLE)
            self.txn_status = buf[start + 5 : start + 6]
            if self._startup_timer is not None:
                self._startup_timer.cancel()
            self.ctx.session_ready(self)
            log.info("session.start", session=self.id, user=self.user, db=self.database,
                     client=self.client_addr, tls=self.tls)
            if self._shutting_down:
                asyncio.get_running_loop().call_soon(self._shutdown_if_idle)
            return prefix + buf[start:end] if prefix else FORWARD
        return FORWARD

    def _negotiate_prefix(self) -> bytes:
        if not self._owe_negotiate:
            return b""
        self._owe_negotiate = False
        return m.negotiate_protocol_version(m.NEWEST_MINOR, [])

    def _our_key_data(self, secret_len: int) -> bytes:
        if self._our_pid is not None:
            self.ctx.cancels.release(self._our_pid)
        pid, secret = self.ctx.cancels.issue(self, secret_len)
        self._our_pid = pid
        return m.backend_key_data(pid, secret)

    def _track_parameter(self, buf: bytes, start: int, end: int) -> None:
        name, value = m.parse_parameter_status(buf, start, end)
        self._params[name] = value
        if name == "client_encoding":
            self._encoding = ENCODINGS.get(value.upper(), "unknown")
            self._enc_saved = None
        elif name == "standard_conforming_strings":
            self._facts.standard_conforming_strings = value == "on"
            self._scs_saved = None

    def _shutdown_if_idle(self) -> None:
        if self.state != CLOSED and self._idle():
            self.close(fatal_shutdown())

    # -- cancel ---------------------------------------------------------------------------------

    def cancel_requested(self) -> None:
        """A CancelRequest with our key arrived: it cancels a held statement, or is forwarded
        upstream while something is in flight."""
        if self.ctx.holds.end(self.id, HoldOutcome.CANCEL):
            return
        if self.state != READY or not self._fifo or self._real_key is None:
            return
        pid, secret = self._real_key
        self.ctx.spawn(self.ctx.forward_cancel(pid, secret))

    @property
    def parameters(self) -> dict[str, str]:
        return self._params


_OUTCOME_DECISION = {HoldOutcome.RELEASED: "released", HoldOutcome.TIMEOUT: "timed_out",
                     HoldOutcome.CANCEL: "canceled"}


def _poison(kind: int) -> bytes:
    """A message sure to fail at the same pipeline position (PROTOCOL §3)."""
    return m.query(POISON_SQL) if kind == K_QUERY else m.execute(POISON_PORTAL)


def fatal_shutdown() -> bytes:
    return m.error_response(SqlState.ADMIN_SHUTDOWN,
                            "terminating connection due to administrator command",
                            severity="FATAL")


OnClose = Callable[[Session], None]
