"""The usual statement events waiting for the audit writer: `AuditSink.emit_usual()` adds,
the writer thread takes them all at once (`AuditSink._drain`).

This is the reference, in Python. `_usual.pyx` is the same as C data: one C struct per event
(the template's parts, duration, rows, ts), no Python object made per event on the event loop,
read by the C line writer (`_auditline.StatementLines.block`) as it is. An extension module is
imported before a .py of the same name.

Emitters (the event loop, any thread) and the writer hold the GIL while they touch it, which is
all the locking it needs: add() and take() are one list operation each here, C code that runs
no Python code there.
"""

from __future__ import annotations

__all__ = ["MAX_ROWS", "UsualEvents"]

MAX_ROWS = (1 << 63) - 1  # a C long long


class UsualEvents:
    """Events in the order added: (template parts, duration, rows, ts)."""

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: list[tuple[tuple[bytes, ...], float, int, float]] = []

    def add(self, parts: tuple[bytes, ...], duration: float, rows: object, ts: float) -> bool:
        """Add one event; False (nothing added) when `rows` is not a count that fits a C long
        long: the sink chains that event itself."""
        if type(rows) is not int or not 0 <= rows <= MAX_ROWS:
            return False
        if type(parts) is not tuple:
            if parts is None:
                return False
            raise TypeError("parts must be a tuple")
        self._events.append((parts, float(duration), rows, float(ts)))
        return True

    def take(self, into: UsualEvents) -> None:
        """Move every event, in order, to `into` (what it held is dropped; into is self: no
        change)."""
        if not isinstance(into, UsualEvents):
            raise TypeError("take() needs a UsualEvents")
        if into is self:
            return
        events = self._events
        n = len(events)
        into._events = events[:n]  # added meanwhile (another thread): after n, kept
        del events[:n]

    def event(self, i: int) -> tuple[tuple[bytes, ...], float, int, float]:
        if not 0 <= i < len(self._events):
            raise IndexError("no such event")
        return self._events[i]

    def ts(self, i: int) -> float:
        return self.event(i)[3]

    def clear(self) -> None:
        self._events = []

    def __len__(self) -> int:
        return len(self._events)
