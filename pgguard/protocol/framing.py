# cython: boundscheck=False, wraparound=False
# (Compiled, an index is not checked: the scan loop reads only below the length it has checked,
# and a table is checked to have 256 entries when it is set.)
"""Sans-IO framing of PostgreSQL v3 messages (after the startup packet): `type byte, int32 length`.

`Framer.feed(data)` returns the byte slices to write to the other side, in order (`relay(data)`
the same without making a list for one slice). Bytes are
forwarded unchanged and in bulk: a run of messages that nobody needs to look at leaves as one
slice of the input, and a long message of a *streamed* type (DataRow, CopyData, NoticeResponse,
and Bind's values) leaves as it arrives, never gathered in memory.

What happens to each message type is one table (`FrameTable`, 256 entries):

    SKIP     forward without a callback; may be streamed before it is complete
    INSPECT  gather the whole message, then call `on_frame(type, buf, start, end)`
    HEAD     gather the first `head_bytes` of the body (or the whole message if shorter), call
             `on_frame` with that head (end = start + 5 + head length), then stream the rest
             (or swallow it, when the message was replaced)
    INVALID  ProtocolError (frontend only: PostgreSQL ends the connection the same way)
    LATER    gather the whole message and forward it unchanged with the bytes around it; call
             `on_frame` later: from `run_later()`, which the owner calls once it has written
             what `feed()` returned, or before any other callback (the order is kept). For the
             messages that are only bookkeeping: the reply reaches the peer first. The verdict
             of a LATER callback is ignored (the message has been forwarded).

`on_frame` answers FORWARD (None), replacement bytes (sent instead of the message), or HOLD: the
framer stops at that message and keeps it, and everything after it, unconsumed until
`resume()` is called with the verdict (FORWARD or replacement bytes). Later `feed()` calls only
append to the held backlog (`backlog_size` says how much, so the owner can stop reading).

`on_frame` is a function, or a `FrameHandler` whose `on_frame` method is called: compiled
(framing.pxd), that is a C call with C integers, which the relay's session uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast

from pgguard.errors import MessageTooLarge, ProtocolError

__all__ = [
    "FORWARD",
    "HEAD",
    "HOLD",
    "INSPECT",
    "INVALID",
    "LATER",
    "SKIP",
    "FrameHandler",
    "FrameTable",
    "Framer",
    "Verdict",
    "frame_table",
]

# The modes as the framer compares them: C integers when compiled (framing.pxd), where a
# module constant would be looked up and boxed at each message. The public names follow.
_SKIP, _INSPECT, _HEAD, _INVALID, _LATER = range(5)
SKIP: Final = _SKIP
INSPECT: Final = _INSPECT
HEAD: Final = _HEAD
INVALID: Final = _INVALID
LATER: Final = _LATER


class _Hold:
    __slots__ = ()

    def __repr__(self) -> str:
        return "HOLD"


FORWARD: Final = None
HOLD: Final = _Hold()

Verdict = bytes | _Hold | None
FrameTable = bytes  # 256 entries, one mode per type byte
Chunks = bytes | list[bytes] | None  # what to write: one bytes object, several, or nothing
OnFrame = Callable[[int, bytes, int, int], Verdict]


class FrameHandler:
    """What a Framer calls back, as an object: subclass it and override `on_frame`."""

    __slots__ = ()

    def on_frame(self, typ: int, buf: bytes, start: int, end: int) -> Verdict:
        raise NotImplementedError


class _Function(FrameHandler):
    """A plain `on_frame` function, as a FrameHandler."""

    __slots__ = ("function",)

    def __init__(self, function: OnFrame) -> None:
        self.function = function

    def on_frame(self, typ: int, buf: bytes, start: int, end: int) -> Verdict:
        return self.function(typ, buf, start, end)


def frame_table(default: int, **modes: str) -> FrameTable:
    """Build a table: `frame_table(SKIP, inspect="QP", head="B")`."""
    unknown = set(modes) - {"skip", "inspect", "head", "invalid", "later"}
    if unknown:  # a typo would otherwise leave those types at the default mode
        raise TypeError(f"unknown frame_table modes: {sorted(unknown)}")
    table = bytearray([default]) * 256
    for name, mode in (("skip", SKIP), ("inspect", INSPECT), ("head", HEAD), ("invalid", INVALID),
                       ("later", LATER)):
        for ch in modes.get(name, ""):
            if ord(ch) > 255:
                raise ValueError(f"not a message type byte: {ch!r}")
            table[ord(ch)] = mode
    return bytes(table)


def _checked(table: FrameTable) -> FrameTable:
    if type(table) is not bytes or len(table) != 256:
        raise ValueError("a frame table is 256 bytes (frame_table())")
    return table


class Framer:
    __slots__ = (
        "_buf",
        "_drop_left",
        "_handler",
        "_head_bytes",
        "_held",
        "_held_buf",
        "_later_buf",
        "_later_end",
        "_later_start",
        "_later_table",
        "_max_len",
        "_need",
        "_stream_left",
        "_table",
    )

    def __init__(self, table: FrameTable, on_frame: OnFrame | FrameHandler, *,
                 max_len: int = 0x7FFFFFFF, head_bytes: int = 4096) -> None:
        self._table = _checked(table)
        self._handler = on_frame if isinstance(on_frame, FrameHandler) else _Function(on_frame)
        self._max_len = max_len
        self._head_bytes = head_bytes
        self._buf = bytearray()  # an incomplete message waiting for more bytes
        self._need = 0  # how many bytes _buf must hold before it is worth scanning again
        self._stream_left = 0  # bytes of a streamed message still to pass through
        self._drop_left = 0  # bytes of a replaced HEAD message still to swallow
        self._held = False
        self._held_buf = bytearray()
        # LATER messages not called back yet: the part of _later_buf from the first one's start
        # to the last one's end (0: none), and the table they were framed with. Only whole
        # SKIP and LATER messages are in it: any other kind calls them back first.
        self._later_buf = b""
        self._later_start = 0
        self._later_end = 0
        self._later_table = table

    def set_table(self, table: FrameTable) -> None:
        """From the next feed() on (e.g. after the startup phase)."""
        self._table = _checked(table)

    def run_later(self) -> None:
        """Call back the LATER messages forwarded so far, in order."""
        end = self._later_end
        if not end:
            return
        buf, table, pos = self._later_buf, self._later_table, self._later_start
        self._later_end = 0
        self._later_buf = b""
        handler = self._handler
        while pos < end:  # walked again: lengths were checked when they were framed
            nxt = pos + 1 + (((buf[pos + 1] ^ 0x80) - 0x80) * 0x1000000
                             + (buf[pos + 2] << 16 | buf[pos + 3] << 8 | buf[pos + 4]))
            if table[buf[pos]] == _LATER:
                handler.on_frame(buf[pos], buf, pos, nxt)
            pos = nxt

    @property
    def holding(self) -> bool:
        return self._held

    @property
    def backlog_size(self) -> int:
        return len(self._held_buf)

    @property
    def idle(self) -> bool:
        """True between messages: nothing partial buffered or streaming."""
        return (not self._buf and not self._stream_left and not self._drop_left
                and not self._held and not self._later_end)

    def feed(self, data: bytes) -> list[bytes]:
        return _as_list(self.relay(data))

    def relay(self, data: bytes) -> Chunks:
        """feed() for a relay: what to write as one bytes object (the usual case: no list is
        made), a list of them, or None when there is nothing to write."""
        if self._held:
            self._held_buf += data
            return None
        if not data:
            return None
        if self._drop_left:
            n = len(data)
            if n <= self._drop_left:
                self._drop_left -= n
                return None
            data = data[self._drop_left :]
            self._drop_left = 0
        out: Chunks = None
        if self._stream_left:
            n = len(data)
            if n <= self._stream_left:
                self._stream_left -= n
                return data
            out = data[: self._stream_left]
            data = data[self._stream_left :]
            self._stream_left = 0
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return out
            data = bytes(self._buf)
            self._buf = bytearray()
        return self._scan(data, out)

    def resume(self, verdict: bytes | None) -> list[bytes]:
        """End a hold: forward the held message (None) or send `verdict` instead of it."""
        if not self._held:
            raise RuntimeError("resume() without a hold")
        data = bytes(self._held_buf)
        self._held = False
        self._held_buf = bytearray()
        # The held message is complete at the start of `data` (it was INSPECT or HEAD).
        length = int.from_bytes(data[1:5], "big")
        end = 1 + length
        out: Chunks
        if verdict is None:
            if end <= len(data):
                out = data[:end]
            else:  # a HEAD message held before all of it arrived
                self._stream_left = end - len(data)
                return [data]
        else:
            out = verdict
            if end > len(data):
                # Swallow the rest of a replaced message that is still arriving.
                self._drop_left = end - len(data)
                return [verdict]
        return _as_list(self._scan(data[end:], out))

    def _scan(self, data: bytes, out: Chunks) -> Chunks:
        """Frame `data`; returns `out` with what to write after it (_add)."""
        # The hot loop of the relay: locals only, no slicing until a run of unchanged bytes is
        # written out. Compiled (framing.pxd), it touches no Python object but the callbacks.
        if self._later_end:  # messages of an earlier feed() not called back yet: they come first
            self.run_later()
        table, handler, max_len = self._table, self._handler, self._max_len
        n = len(data)
        pos = 0
        flushed = 0  # data[flushed:pos] is forwarded unchanged, written in one slice
        while pos + 5 <= n:
            mode = table[data[pos]]
            # Int32, signed as PostgreSQL reads it: a negative length is invalid, not "large".
            # (The high byte is made signed first: compiled, no step overflows a C int.)
            length = (((data[pos + 1] ^ 0x80) - 0x80) * 0x1000000
                      + (data[pos + 2] << 16 | data[pos + 3] << 8 | data[pos + 4]))
            if length < 4 or length > max_len:
                if length < 4:
                    raise ProtocolError(f"invalid message length {length}")
                raise MessageTooLarge(f"message of {length} bytes exceeds the limit")
            end = pos + 1 + length
            if mode == _SKIP:
                if end > n:
                    self._stream_left = end - n
                    pos = n
                    break
                pos = end
                continue
            if mode == _INVALID:
                raise ProtocolError(f"invalid message type {chr(data[pos])!r}")
            # INSPECT and LATER see the whole message; HEAD sees at most its first head_bytes,
            # however much of it has arrived, so the callback does not depend on how reads split.
            seen = min(end, pos + 5 + self._head_bytes) if mode == _HEAD else end
            if seen > n:
                self._need = seen - pos
                break  # wait for the whole message (INSPECT, LATER) or its head (HEAD)
            if mode == _LATER:  # forwarded with the run it is in; called back later
                if not self._later_end:
                    self._later_buf = data
                    self._later_start = pos
                    self._later_table = table
                self._later_end = end
                pos = end
                continue
            if self._later_end:  # the LATER messages before this one are called back first
                self.run_later()
            verdict = handler.on_frame(data[pos], data, pos, seen)
            if verdict is None:
                if end > n:  # a HEAD message: stream the rest as it arrives
                    self._stream_left = end - n
                    pos = n
                    break
                pos = end
                continue
            if pos > flushed:
                out = _add(out, data[flushed:pos])
            if verdict is HOLD:
                self._held = True
                self._held_buf += data[pos:]
                return out
            out = _add(out, cast(bytes, verdict))  # replacement bytes (HOLD returned above)
            if end > n:  # a replaced HEAD message: swallow the rest as it arrives
                self._drop_left = end - n
                return out
            pos = flushed = end
        if pos > flushed:  # (all of it, the usual case: the bytes object itself, no slice)
            out = _add(out, data if flushed == 0 and pos == n else data[flushed:pos])
        if pos < n:
            if pos + 5 > n:
                self._need = 5
            self._buf = bytearray(data[pos:])
        return out


def _add(out: Chunks, chunk: bytes) -> Chunks:
    """`out` and then `chunk`: a list only from the second chunk on."""
    if out is None:
        return chunk
    if type(out) is list:
        out.append(chunk)
        return out
    return [out, chunk]  # type: ignore[list-item]


def _as_list(out: Chunks) -> list[bytes]:
    if out is None:
        return []
    if type(out) is list:
        return out
    return [out]  # type: ignore[list-item]
