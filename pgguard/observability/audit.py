"""The audit trail (DESIGN §7): one JSON line per event, hash-chained, written off the hot path.

Each line is an object with `id` (monotonic across restarts and rotations), `ts` (RFC 3339 UTC,
microseconds, `Z`), `event`, the event's fields (`session`, `user`, `client_addr` where they
apply), `prev` and `hash`:

    hash = sha256(canonical_json(event without "hash")).hexdigest()
    canonical_json = json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                ensure_ascii=False).encode("utf-8")

`prev` is the previous event's `hash`, 64 zeros (`GENESIS`) for the first event ever. After a
restart the chain continues from the last line of the existing file (or, if that file is empty,
the newest rotated one); a rotated file's first `prev` is the last hash of the file before it.

How the hot path uses it:

    sink = AuditSink(AuditConfig.from_settings(config.audit),  # pgguard.config's section
                     on_error=metrics.audit_errors.inc)
    sink.start()                               # the writer thread
    sink.emit(SESSION_START, session=sid, user="alice", client_addr="10.0.0.7:51234")
    sink.emit(STATEMENT, session=sid, user="alice", classification=c, sql=text,
              decision="allowed", rule="oncall", duration=0.0012)
    sink.emit_statement(sid, "alice", addr, c, "allowed", "oncall", 0.0012, rows=1)  # hot path
    if not sink.healthy: refuse sensitive statements (58000, DESIGN §3)
    await sink.close()

`emit()` chains the event where it is called (id, prev, hash: a few µs, no I/O) and queues
the line; one writer thread drains the queue in batches, writes, fsyncs (`every` batch, or at
most every `fsync_interval` seconds) and rotates. The usual statement event (one per
statement: rows, no error, no step-up) is only noted by `emit_statement()` (its template and
values, as C values in `_usual.UsualEvents`); the writer thread chains the noted events in
batches, in C with the GIL released (`_auditline.block`), while the event loop goes on, and
any other event chains them first,
so the chain keeps the order of emission. A batch is written in one C call without the GIL
(`_auditline.append`: lock, check, write, fsync when due, unlock), so the writer thread takes
the GIL back once per batch rather than after every system call (each time, the event loop
hands it over). When the file does not end where the queued chain starts (another process such
as `pgguard enroll` appended, or the file was replaced), the writer chains the waiting events
again from the file's last event. A write error marks the sink unhealthy, counts the error
(`on_error`: the `pgguard_audit_errors_total` counter), keeps the batch, and retries; the sink
is healthy again once a write succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pgguard.observability._usual import UsualEvents

try:  # the usual statement event's line in C (setup.py); without it, _chain_statement's code
    from pgguard.observability._auditline import StatementLines as _CStatementLines
    from pgguard.observability._auditline import append as _c_append
except ImportError:
    _CStatementLines = None  # type: ignore[assignment,misc]
    _c_append = None  # type: ignore[assignment]

__all__ = [
    "AUDIT_GAP",
    "ENROLL",
    "EVENTS",
    "FORBIDDEN_FIELDS",
    "GENESIS",
    "HOLD_END",
    "HOLD_END_REASONS",
    "HOLD_START",
    "POLICY_RELOAD",
    "SESSION_END",
    "SESSION_START",
    "STATEMENT",
    "STEPUP_CHALLENGE",
    "STEPUP_FAILURE",
    "STEPUP_FAILURE_REASONS",
    "STEPUP_SUCCESS",
    "AuditConfig",
    "AuditError",
    "AuditSink",
    "EventRef",
    "canonical_json",
    "chain_hash",
    "format_ts",
    "last_event",
    "rotated_files",
]

log = logging.getLogger(__name__)

# -- event names (DESIGN §7) --------------------------------------------------------------------

SESSION_START = "session.start"
SESSION_END = "session.end"
STATEMENT = "statement"
HOLD_START = "hold.start"
HOLD_END = "hold.end"
STEPUP_CHALLENGE = "stepup.challenge"
STEPUP_SUCCESS = "stepup.success"
STEPUP_FAILURE = "stepup.failure"
ENROLL = "enroll"
POLICY_RELOAD = "policy.reload"
# Written by the sink itself after events had to be dropped (queue overflow): the record says so.
AUDIT_GAP = "audit.gap"

EVENTS: frozenset[str] = frozenset({
    SESSION_START, SESSION_END, STATEMENT, HOLD_START, HOLD_END, STEPUP_CHALLENGE,
    STEPUP_SUCCESS, STEPUP_FAILURE, ENROLL, POLICY_RELOAD, AUDIT_GAP})

# `hold.end` field `reason`, `stepup.failure` field `reason`.
HOLD_END_REASONS = ("released", "timeout", "cancel", "disconnect", "shutdown")
STEPUP_FAILURE_REASONS = ("bad_code", "replay", "locked", "unknown_session", "not_enrolled")

# Field names that must never reach the trail (OTP codes, secrets, passwords, bind values):
# emit() refuses them outright so a wiring mistake fails loudly in tests, not silently in logs.
FORBIDDEN_FIELDS: frozenset[str] = frozenset({
    "code", "otp", "totp", "secret", "password", "passwd", "token", "key", "binds", "bind",
    "params", "parameters", "bind_values"})

GENESIS = "0" * 64

_FSYNC_MODES = ("every", "interval")


class AuditError(Exception):
    """The trail cannot be opened or continued (e.g. its last line is not an audit event)."""


# -- the chain ------------------------------------------------------------------------------------


def canonical_json(event: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no spaces, UTF-8 (not ASCII-escaped)."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def chain_hash(event: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of `event` without its `hash` key."""
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def format_ts(epoch: float) -> str:
    """RFC 3339, UTC, microseconds: `2025-01-31T12:00:00.123456Z`."""
    sec, us = divmod(round(epoch * 1e6), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{us:06d}Z"


def statement_duration(seconds: float) -> float:
    """A statement event's `duration`: seconds to the microsecond (the nearest float to a whole
    number of microseconds, so its JSON is a function of that number; see _Durations)."""
    return round(seconds * 1e6) / 1e6


_SHA256 = hashlib.sha256()  # copied for each statement event
_DIGITS3 = tuple(f"{i:03d}" for i in range(1000))  # microseconds as two groups of three


class _Durations:
    """The JSON text (UTF-8) of `statement_duration(seconds)`, by whole microseconds: float
    repr is the costliest part of a statement event, and durations repeat."""

    __slots__ = ("_cache",)
    LIMIT = 1 << 16

    def __init__(self) -> None:
        self._cache: dict[int, bytes] = {}

    def text(self, seconds: float) -> bytes:
        us = round(seconds * 1e6)
        hit = self._cache.get(us)
        if hit is None:
            if len(self._cache) >= self.LIMIT:
                self._cache.clear()
            hit = self._cache[us] = repr(us / 1e6).encode()
        return hit


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The `audit:` section of pgguard.yaml (DESIGN §5). `path=None` writes no file."""

    path: Path | None = None
    include_literals: bool = False
    fsync: str = "interval"          # every | interval
    fsync_interval: float = 1.0      # seconds, for fsync: interval
    rotate_bytes: int = 256 << 20    # 0: never rotate
    stdout: bool = False             # also write each line to stdout (containers)
    max_pending: int = 100_000       # queued events beyond this are dropped (and say so)
    retry_interval: float = 0.5      # seconds between write attempts while unhealthy

    def __post_init__(self) -> None:
        if self.fsync not in _FSYNC_MODES:
            raise ValueError(f"audit.fsync must be every or interval, not {self.fsync!r}")

    @classmethod
    def from_settings(cls, settings: Any) -> AuditConfig:
        """From the validated `pgguard.config.AuditConfig` (attributes path, include_literals,
        fsync, rotate_bytes, stdout; paths already absolute, rotate_bytes None = default)."""
        kwargs: dict[str, Any] = {
            "path": Path(settings.path) if getattr(settings, "path", None) else None,
            "include_literals": bool(getattr(settings, "include_literals", False)),
            "fsync": str(getattr(settings, "fsync", "interval")),
            "stdout": bool(getattr(settings, "stdout", False)),
        }
        if getattr(settings, "rotate_bytes", None) is not None:
            kwargs["rotate_bytes"] = int(settings.rotate_bytes)
        return cls(**kwargs)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], base_dir: Path | None = None) -> AuditConfig:
        """Build from the YAML mapping; `path` relative to `base_dir` (the config's folder).
        Sizes and durations accept the config syntax (`256MiB`, `1s`)."""
        from pgguard.config import parse_duration, parse_size

        known = {"path", "include_literals", "fsync", "fsync_interval", "rotate_bytes", "stdout",
                 "max_pending", "retry_interval"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown key audit.{unknown[0]}")
        path: Path | None = None
        if raw.get("path"):
            path = Path(str(raw["path"]))
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
        kwargs: dict[str, Any] = {"path": path}
        if "include_literals" in raw:
            kwargs["include_literals"] = bool(raw["include_literals"])
        if "fsync" in raw:
            kwargs["fsync"] = str(raw["fsync"])
        if "fsync_interval" in raw:
            kwargs["fsync_interval"] = parse_duration(raw["fsync_interval"])
        if "rotate_bytes" in raw:
            kwargs["rotate_bytes"] = parse_size(raw["rotate_bytes"])
        if "stdout" in raw:
            kwargs["stdout"] = bool(raw["stdout"])
        if "max_pending" in raw:
            kwargs["max_pending"] = int(raw["max_pending"])
        if "retry_interval" in raw:
            kwargs["retry_interval"] = parse_duration(raw["retry_interval"])
        return cls(**kwargs)


# -- files ---------------------------------------------------------------------------------------

_ROTATED_SUFFIX = re.compile(r"^\.(\d{8}T\d{12}Z)(?:\.(\d+))?$")


def rotated_files(path: Path) -> list[Path]:
    """The rotated siblings of `path` (`audit.jsonl.20250131T120000123456Z`), oldest first."""
    if not path.parent.is_dir():
        return []
    found: list[tuple[str, int, Path]] = []
    for p in path.parent.iterdir():
        if p.name.startswith(path.name) and p != path:
            m = _ROTATED_SUFFIX.match(p.name[len(path.name):])
            if m:
                found.append((m.group(1), int(m.group(2) or 0), p))
    return [p for _, _, p in sorted(found)]


def _last_line(path: Path) -> bytes | None:
    """The last complete line of a regular file (None if empty, missing or not a file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    with path.open("rb") as f:
        end = st.st_size
        chunk = 1 << 16
        buf = b""
        pos = end
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            stripped = buf.rstrip(b"\n")
            nl = stripped.rfind(b"\n")
            if nl >= 0:
                return stripped[nl + 1:]
        stripped = buf.rstrip(b"\n")
        return stripped or None


def last_event(path: Path) -> dict[str, Any] | None:
    """The last event of the trail at `path` (or of its newest rotated file if `path` is empty)."""
    for candidate in [path, *reversed(rotated_files(path))]:
        line = _last_line(candidate)
        if line is None:
            continue
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise AuditError(f"{candidate}: the last line is not JSON; cannot continue the "
                             f"chain (run pgguard audit verify)") from exc
        if not isinstance(event, dict) or not isinstance(event.get("hash"), str) \
                or not isinstance(event.get("id"), int):
            raise AuditError(f"{candidate}: the last line is not an audit event; cannot "
                             f"continue the chain (run pgguard audit verify)")
        return event
    return None


def _truncate_partial_line(path: Path) -> None:
    """A crash or a full disk can leave half a line at the end: it was never acknowledged, and
    it would break the chain, so cut it off before appending."""
    try:
        st = path.stat()
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(st.st_size - 1)
        if f.read(1) == b"\n":
            return
        pos = st.st_size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            nl = f.read(step).rfind(b"\n")
            if nl >= 0:
                f.truncate(pos + nl + 1)
                return
        f.truncate(0)


# -- values --------------------------------------------------------------------------------------


class EventRef:
    """What `emit()` returns: the event's `id` (set when it is chained, i.e. by emit() itself,
    and again if the writer has to chain it again). Pass it as a field of a later event
    (`stepup_event=ref`) and that event records the id."""

    __slots__ = ("id",)

    def __init__(self) -> None:
        self.id: int | None = None


LINGER_SECONDS = 0.05  # how often the writer thread looks for new lines while busy
WALL_OFFSET_SECONDS = 0.05  # how long a measured wall-clock offset is used (AuditSink._wall)

_RESERVED = frozenset({"id", "ts", "event", "prev", "hash", "_ref"})
_PLAIN = frozenset({str, int, bool, type(None)})


def _jsonable(value: Any) -> Any:
    """Sets become sorted lists, enums their values, tuples lists, times RFC 3339."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, EventRef):
        return value.id
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, frozenset | set):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, dt.datetime):
        return format_ts(value.timestamp())
    return str(value)


class _JsonList(list):  # type: ignore[type-arg]
    """A list of JSON-ready values, written as is (no per-event conversion)."""


class _DerivedFields:
    """The statement-event fields a Classification yields, computed once per classification
    object (classifications are cached, so the same few objects recur): the writer thread's
    cost per event is then one dict merge instead of sorting and converting each time."""

    __slots__ = ("_cache",)
    LIMIT = 4096

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Any, dict[str, Any]]] = {}

    def of(self, c: Any) -> dict[str, Any]:
        hit = self._cache.get(id(c))
        if hit is not None and hit[0] is c:
            return hit[1]
        derived: dict[str, Any] = {
            "classes": _JsonList(sorted(x.value for x in c.classes)),
            "tables": _JsonList(c.tables),
            "pii_columns": _JsonList(c.pii_columns),
            "fingerprint": c.fingerprint,
            "redacted_sql": c.redacted_sql,
        }
        if c.reason is not None:
            derived["reason"] = c.reason
        if len(self._cache) >= self.LIMIT:
            self._cache.clear()
        self._cache[id(c)] = (c, derived)  # holding `c` keeps its id from being reused
        return derived


_PLAIN = _PLAIN | {_JsonList}


def _statement_fields(fields: dict[str, Any], include_literals: bool,
                      derived: _DerivedFields | None = None) -> None:
    """Expand `classification=` into the statement event's fields (in the writer thread), and
    keep the raw `sql` only with include_literals."""
    c = fields.pop("classification", None)
    sql = fields.pop("sql", None)
    if c is not None:
        for k, v in (derived or _DerivedFields()).of(c).items():
            fields.setdefault(k, v)
    if include_literals and sql is not None:
        fields["sql"] = sql


# The queue's event slot for emit_statement() lines. They keep nothing but the line (no
# arguments: thousands of events wait for the writer, and the garbage collector would walk
# them all): a rare re-chain reads the event back from the line (_rechain_line).
_FAST_STATEMENT = object()
# The slot for a block of deferred statement events chained together (_drain): the lines
# joined, and the count in place of the fields.
_FAST_BLOCK = object()


def _events(batch: list[tuple[bytes, str, float, Any, Any]]) -> int:
    """How many events a batch of queued entries holds."""
    return sum(e[4] if e[3] is _FAST_BLOCK else 1 for e in batch)


class _Templates:
    """Statement events from one classification and session differ only in their duration,
    error, id, prev, rows, stepup_event and ts. For each such family the canonical JSON is
    made once with a marker in place of each variable value, and cut at the markers (kept as
    UTF-8): writing an event is one join of those parts with the JSON of each value, which
    gives exactly `canonical_json()` of the event (tests/unit/test_audit.py checks it, whatever
    the values)."""

    __slots__ = ("_derived", "_marks", "cache")
    LIMIT = 4096
    SLOTS = ("duration", "error", "id", "prev", "rows", "stepup_event", "ts")  # sorted

    def __init__(self, derived: _DerivedFields) -> None:
        # (id(c), session, user, client_addr, decision, rule, has_rows, has_error,
        # has_stepup) → (c, parts); the sink reads it directly on the hot path.
        self.cache: dict[tuple[Any, ...], tuple[Any, tuple[bytes, ...]]] = {}
        self._derived = derived
        # A NUL cannot occur in SQL text, user names or addresses from the wire; the nonce
        # makes a clash impossible in practice anyway (a clash falls back to the slow path).
        nonce = os.urandom(8).hex()
        self._marks = {k: f"\x00{nonce}:{k}\x00" for k in self.SLOTS}

    def get(self, sink: AuditSink, c: Any, session: str, user: str, client_addr: str,
            decision: str, rule: str | None, has_rows: bool, has_error: bool,
            has_stepup: bool) -> tuple[bytes, ...] | None:
        key = (id(c), session, user, client_addr, decision, rule, has_rows, has_error,
               has_stepup)
        hit = self.cache.get(key)
        if hit is not None and hit[0] is c:
            return hit[1]
        parts = self._make(sink, c, session, user, client_addr, decision, rule, has_rows,
                           has_error, has_stepup)
        if parts is None:
            return None
        if len(self.cache) >= self.LIMIT:
            self.cache.clear()
        self.cache[key] = (c, parts)  # holding `c` keeps its id from being reused
        return parts

    def _make(self, sink: AuditSink, c: Any, session: str, user: str, client_addr: str,
              decision: str, rule: str | None, has_rows: bool, has_error: bool,
              has_stepup: bool) -> tuple[bytes, ...] | None:
        marks = self._marks
        fields: dict[str, Any] = {"session": session, "user": user, "client_addr": client_addr,
                                  "classification": c, "decision": decision, "rule": rule,
                                  "duration": marks["duration"]}
        if has_rows:
            fields["rows"] = marks["rows"]
        if has_error:
            fields["error"] = marks["error"]
        if has_stepup:
            fields["stepup_event"] = marks["stepup_event"]
        _statement_fields(fields, sink.config.include_literals, self._derived)
        record: dict[str, Any] = {"id": marks["id"], "ts": marks["ts"], "event": STATEMENT}
        for k, v in fields.items():
            if k not in _RESERVED:
                record[k] = v if type(v) in _PLAIN else _jsonable(v)
        record["prev"] = marks["prev"]
        rest = canonical_json(record).decode("utf-8")
        parts: list[str] = []
        for k in self.SLOTS:  # sorted, as canonical JSON writes the keys
            if k in record:
                mark = json.dumps(marks[k], ensure_ascii=False)
                if rest.count(mark) != 1:
                    return None
                before, rest = rest.split(mark)
                if k in ("ts", "prev"):  # strings whose values need no escaping: keep quotes
                    before, rest = before + '"', '"' + rest
                parts.append(before)
        parts.append(rest)
        return tuple(part.encode("utf-8") for part in parts)


# -- the sink ------------------------------------------------------------------------------------


class _Barrier:
    """Queued by flush(): fires once everything queued before it was written (or failed)."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[bool], object]) -> None:
        self.callback = callback


_STOP = object()
_WAKE = object()  # from an emitter: lines are waiting and the writer was idle


class AuditSink:
    """Hash-chained JSON-lines audit trail written by one background thread.

    Thread-safety: `emit()` may be called from any thread; everything else from the owner.
    """

    def __init__(self, config: AuditConfig, *, on_error: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 stdout: IO[str] | None = None) -> None:
        self.config = config
        self._on_error = on_error
        self._clock = clock
        self._stdout = stdout if stdout is not None else (sys.stdout if config.stdout else None)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_pending = config.max_pending
        self._held = 0             # events the writer holds (retrying), not in the queue
        self._dropped_total = 0    # events refused because the backlog was full
        self._dropped_chained = 0  # ... of which an audit.gap event has told the record
        # The chain is made under this lock: `_last_id`/`_last_hash` are the newest event
        # chained. `_file_id`/`_file_hash` are the last event in the file
        # as the writer thread knows it; when another process appended (or the file changed
        # under us), the writer chains the waiting events again from there (`_rebase`).
        self._chain_lock = threading.Lock()
        self._file_id = 0
        self._file_hash = GENESIS
        # Chained lines for the writer, appended under the chain lock (the queue carries only
        # flush barriers and the stop).
        self._pending: list[tuple[bytes, str, float, Any, Any]] = []
        # Usual statement events not chained yet, in order (template parts, duration, rows,
        # ts): compiled, C structs, no Python object per event (_usual.pyx). Chaining them
        # (`_drain`) comes before any other event's. No lock: emitters add one event in one
        # step under the GIL, and `_drain` takes all there are in one step, into
        # `_usual_batch` (under the chain lock), so none is lost, split or taken twice.
        self._usual = UsualEvents()
        self._usual_batch = UsualEvents()
        # The writer found nothing last time and waits for a _WAKE (the next emitter sends
        # one): prompt writes when events are few, no wake-ups when they are many.
        self._idle = False
        self._wall_offset = 0.0  # _clock() - time.monotonic(), measured at _offset_at (_wall)
        self._offset_at = -math.inf
        self._healthy = True
        self._errors = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._file: IO[bytes] | None = None
        self._last_id = 0
        self._ts_sec = -1
        self._ts_prefix = ""
        self._derived = _DerivedFields()
        self._templates = _Templates(self._derived)
        self._durations = _Durations()
        # The usual statement line in C when built (_auditline.pyx), else the Python code.
        self._lines = _CStatementLines() if _CStatementLines is not None else None
        self._last_hash = GENESIS
        self._last_fsync = 0.0
        self._dirty = False
        self._needs_reopen = True
        self._size = 0  # the file's size after our last write: larger means another writer
        self.last_error: str | None = None

    # -- public state ---------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while the trail cannot be written: refuse sensitive statements (58000)."""
        return self._healthy

    @property
    def errors(self) -> int:
        """Write errors so far (each also reported to `on_error`)."""
        return self._errors

    @property
    def include_literals(self) -> bool:
        return self.config.include_literals

    @property
    def last_hash(self) -> str:
        """The hash of the last event emitted (GENESIS before the first)."""
        with self._chain_lock:
            self._drain()
            return self._last_hash

    @property
    def last_id(self) -> int:
        with self._chain_lock:
            self._drain()
            return self._last_id

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Find where the chain stands, open the file and start the writer thread. Raises
        AuditError if the existing trail's last line cannot be continued; an unwritable path
        only makes the sink unhealthy (the writer keeps retrying)."""
        if self._thread is not None:
            return
        if self.config.path is not None:
            try:
                self._open()
            except OSError as exc:
                self._failed(exc)
            self._last_id, self._last_hash = self._file_id, self._file_hash
        self._thread = threading.Thread(target=self._run, name="pgguard-audit", daemon=True)
        self._thread.start()

    async def flush(self) -> bool:
        """Wait until everything emitted so far is written and fsynced (the writer answers after
        its next write attempt). False if that write failed."""
        if self._thread is None or not self._thread.is_alive():
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()

        def resolve(ok: bool) -> None:
            if not fut.done():
                fut.set_result(ok)

        def done(ok: bool) -> None:
            loop.call_soon_threadsafe(resolve, ok)

        self._queue.put(_Barrier(done))
        return await fut

    def flush_sync(self, timeout: float = 10.0) -> bool:
        """flush() for threads and synchronous code (CLI commands, tests)."""
        if self._thread is None or not self._thread.is_alive():
            return False
        event = threading.Event()
        result: list[bool] = []

        def done(ok: bool) -> None:
            result.append(ok)
            event.set()

        self._queue.put(_Barrier(done))
        return event.wait(timeout) and result[0]

    async def close(self) -> None:
        """Write what is queued (one last attempt), fsync, stop the thread (waits ≤ 10 s)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        self._close_file()

    # -- the hot path ---------------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> EventRef:
        """Chain one event and queue its line for the writer (no I/O here). Values must not be
        mutated afterwards (a rare re-chain reads them again).

        `statement` events may pass `classification=` (expanded into classes, tables,
        pii_columns, fingerprint, redacted_sql) and `sql=` (written only with include_literals).
        """
        if fields.keys() & FORBIDDEN_FIELDS:
            raise ValueError(f"audit fields {sorted(fields.keys() & FORBIDDEN_FIELDS)} are "
                             f"never written (DESIGN §7)")
        ref = EventRef()
        if self._closed:
            return ref
        if self._held + len(self._pending) >= self._max_pending:
            # The writer is stuck (disk gone?) and memory is not infinite: drop, say so (an
            # audit.gap event), and stay unhealthy so sensitive statements are refused.
            self._dropped_total += 1
            self._healthy = False
            return ref
        fields["_ref"] = ref
        ts = self._clock()
        with self._chain_lock:
            self._drain()
            self._say_gap()
            prev = self._last_hash
            line = self._chain(ts, event, dict(fields))
            self._pending.append((line, prev, ts, event, fields))
            self._wake_if_idle()
        return ref

    def emit_statement(self, session: str, user: str, client_addr: str, classification: Any,
                       decision: str, rule: str | None, duration: float,
                       rows: int | None = None, error: str | None = None,
                       stepup_event: Any = None, now: float = -1.0) -> None:
        """The `statement` event of a forwarded statement, at completion: what `emit(STATEMENT,
        ...)` writes, for the hot path: no dict, no EventRef, and the line joined from the
        parts of a template made once per classification and session (`_Templates`). The
        usual one (rows, no error, no step-up) goes to `emit_usual`. `now`: as there."""
        if rows is not None and error is None and stepup_event is None:
            hit = self._templates.cache.get((id(classification), session, user, client_addr,
                                             decision, rule, True, False, False))
            parts = hit[1] if hit is not None and hit[0] is classification else \
                self._templates.get(self, classification, session, user, client_addr,
                                    decision, rule, True, False, False)
            if parts is not None:
                self.emit_usual(parts, duration, rows, now)
                return
        if self._refused():
            return
        ts = self._clock() if now < 0.0 else self._wall(now)
        self._chain_now(ts, (session, user, client_addr, classification, decision, rule,
                             duration, rows, error, stepup_event), None)

    def usual_template(self, session: str, user: str, client_addr: str, classification: Any,
                       decision: str, rule: str | None) -> tuple[bytes, ...] | None:
        """The template of the usual statement events (rows, no error, no step-up) of one
        classification and session, for `emit_usual`; None when a value cannot be templated
        (then emit_statement)."""
        return self._templates.get(self, classification, session, user, client_addr, decision,
                                   rule, True, False, False)

    def emit_usual(self, parts: tuple[bytes, ...], duration: float, rows: int,
                   now: float = -1.0) -> None:
        """emit_statement() of a usual statement event, from its template (`usual_template`):
        only noted here (template, values, time) and chained later, in order (`_drain`).
        `now`: the time.monotonic() reading at which the statement finished, when the caller
        has one (the session does): its `ts` is then that moment on the wall clock (`_wall`),
        with no clock read here."""
        if self._refused():
            return
        ts = self._clock() if now < 0.0 else self._wall(now)
        # (A row count past a C long long is not added: chained now, after those waiting.)
        if self._dropped_total == self._dropped_chained and self._usual.add(parts, duration,
                                                                            rows, ts):
            # After the add: a writer that is going idle looks at the events again after it
            # says so (_run), so either it sees this event or this sees it idle.
            if self._idle:
                self._idle = False
                self._queue.put(_WAKE)
            return
        self._chain_now(ts, None, (parts, duration, rows))  # after the audit.gap of the drops

    def _wall(self, mono: float) -> float:
        """The wall-clock time (`_clock`) of a time.monotonic() reading taken lately: the
        reading plus the offset between the two clocks, measured again once it is older than
        WALL_OFFSET_SECONDS. Both clocks advance at the same rate (NTP slews both), so the
        offset changes only when the wall clock is set: a `ts` follows that within
        WALL_OFFSET_SECONDS. One clock read per statement fewer on the event loop."""
        # (A reading may be a little older than the measurement: statements that finished in
        # one read of the server's replies are reported after it.)
        if not -WALL_OFFSET_SECONDS < mono - self._offset_at < WALL_OFFSET_SECONDS:
            at = time.monotonic()
            wall = self._clock()
            at = (at + time.monotonic()) / 2  # the wall clock was read between these two
            self._wall_offset = wall - at
            self._offset_at = at
        return mono + self._wall_offset

    def _refused(self) -> bool:
        """A statement event is not queued when the sink is closed, or dropped (counted, the
        sink unhealthy until an audit.gap says how many) when the writer's backlog is full."""
        if self._closed:
            return True
        if self._held + len(self._pending) + len(self._usual) >= self._max_pending:
            self._dropped_total += 1
            self._healthy = False
            return True
        return False

    def _chain_now(self, ts: float, args: tuple[Any, ...] | None,
                   usual: tuple[tuple[bytes, ...], float, int] | None) -> None:
        """Chain a statement event now, after the deferred ones and any audit.gap: from its
        emit_statement arguments, or (`usual`) from its template, duration and rows."""
        with self._chain_lock:
            self._drain()
            self._say_gap()
            prev = self._last_hash
            line = (self._usual_line(usual[0], usual[1], usual[2], ts) if usual is not None
                    else self._chain_statement(ts, args))  # type: ignore[arg-type]
            self._pending.append((line, prev, ts, _FAST_STATEMENT, None))
            self._wake_if_idle()

    def _wake_if_idle(self) -> None:
        """Under the chain lock: if the writer waits for lines, tell it there are some."""
        if self._idle:
            self._idle = False
            self._queue.put(_WAKE)

    def _drain(self) -> None:
        """Under the chain lock: chain the deferred statement events, in order, before
        anything else is chained. Their lines are made by the C helper in blocks, without the
        GIL (emitters keep deferring meanwhile); one it declines (or all, when it is not
        built), audit.py makes."""
        if not len(self._usual):
            return
        events = self._usual_batch
        self._usual.take(events)  # added meanwhile: in the next drain
        n = len(events)
        lines = self._lines
        entries: list[tuple[bytes, str, float, Any, Any]] = []
        i = 0
        try:
            while i < n:
                prev = self._last_hash
                count = 0
                if lines is not None:
                    data, count = lines.block(events, i, self._last_id + 1, prev)
                if count:
                    assert lines is not None
                    self._last_id += count
                    self._last_hash = lines.digest
                    entries.append((data, prev, events.ts(i), _FAST_BLOCK, count))
                    i += count
                if i < n:
                    parts, duration, rows, ts = events.event(i)
                    prev = self._last_hash
                    entries.append((self._usual_line(parts, duration, rows, ts), prev, ts,
                                    _FAST_STATEMENT, None))
                    i += 1
        except BaseException:
            # (A value no line can be made of.) What was chained is kept; the rest is lost,
            # and said so: counted as dropped (an audit.gap follows), the sink unhealthy.
            self._dropped_total += n - i
            self._healthy = False
            raise
        finally:
            self._pending += entries
            events.clear()

    def _say_gap(self) -> None:
        """Under the chain lock: if events were dropped, chain an audit.gap saying how many."""
        dropped = self._dropped_total - self._dropped_chained
        if dropped:
            self._dropped_chained += dropped
            ts = self._clock()
            prev = self._last_hash
            fields = {"dropped": dropped}
            self._pending.append((self._chain(ts, AUDIT_GAP, dict(fields)), prev, ts, AUDIT_GAP,
                                  fields))

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        """The writer thread. Should it ever stop on a bug, the sink is unhealthy from then on
        (sensitive statements are refused: nothing would write their events)."""
        try:
            self._write_loop()
        except BaseException as exc:
            log.exception("audit: the writer thread stopped")
            self._healthy = False
            self.last_error = f"the audit writer stopped: {exc!r}"
            self._errors += 1
            if self._on_error is not None:
                with contextlib.suppress(Exception):
                    self._on_error()

    def _write_loop(self) -> None:
        batch: list[tuple[bytes, str, float, Any, Any]] = []
        barriers: list[_Barrier] = []
        stopping = False
        while True:
            # While events come, look for them every LINGER_SECONDS: the emitters do not wake
            # this thread then (no futex call per event on the event loop) and one write (one
            # flock, a few syscalls) carries many events. After a look that found nothing, wait
            # for the next emitter's _WAKE (or flush()/close(), a retry, an fsync falling due).
            timeout = self._wait_time(bool(batch))
            try:
                item = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 \
                    else self._queue.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:  # control messages: barriers, stop
                if item is _STOP:
                    stopping = True
                elif item is not _WAKE:
                    barriers.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            with self._chain_lock:
                self._drain()
                if self._dropped_total != self._dropped_chained:
                    self._say_gap()  # nothing was emitted since the drops: say so now
                # Every line emitted before the barriers just taken is in `pending`.
                batch += self._pending
                self._pending = []
                self._idle = not batch
                if self._idle and len(self._usual):  # added since _drain: not idle after all
                    self._idle = False
            self._held = _events(batch)
            reopen = self._needs_reopen and self.config.path is not None
            if batch or reopen:
                if self._write(batch):
                    batch = []
                    self._held = 0
            elif self._dirty and self.config.fsync == "interval":
                self._fsync_if_due()
            if barriers:
                ok = not batch
                if ok and self._dirty:
                    try:
                        self._fsync()
                    except OSError as exc:
                        self._failed(exc)
                        ok = False
                for b in barriers:
                    b.callback(ok)
                barriers = []
            if stopping:
                if batch:
                    log.error("audit: %d events could not be written at shutdown", len(batch))
                return

    def _wait_time(self, retrying: bool) -> float | None:
        if retrying or not self._healthy:
            return self.config.retry_interval
        due = None
        if self._dirty and self.config.fsync == "interval":
            due = max(0.0, self._last_fsync + self.config.fsync_interval - time.monotonic())
        if self._idle:
            return due  # None: until woken
        return LINGER_SECONDS if due is None else min(due, LINGER_SECONDS)

    def _write(self, batch: list[tuple[bytes, str, float, Any, Any]]) -> bool:
        """Write and (maybe) fsync one batch of chained lines. False if anything failed: the
        caller keeps the batch and retries. The batch may be chained again (`_rebase`) when
        the file does not end where its first line's `prev` says."""
        locked = False  # the general way holds the file's lock until the end
        try:
            if self._needs_reopen and self.config.path is not None:
                self._open()
            data = b""
            if not (batch and self._append_fast(batch)):
                if self._file is not None:
                    locked = True
                    self._lock_for_append()
                    if batch and batch[0][1] != self._file_hash:
                        self._rebase(batch)
                data = b"".join([item[0] for item in batch])
                if self._file is not None and data:
                    self._file.write(data)
                    self._file.flush()
                    self._size = os.fstat(self._file.fileno()).st_size
                    self._dirty = True
                    if self.config.fsync == "every":
                        self._fsync()
                    else:
                        self._fsync_if_due()
            if self._stdout is not None and batch:
                data = data or b"".join([item[0] for item in batch])
                with contextlib.suppress(Exception):
                    self._stdout.write(data.decode("utf-8"))
                    self._stdout.flush()
            if batch and self._file is not None:
                tail = batch[-1][0]
                if batch[-1][3] is _FAST_BLOCK:  # its last line
                    tail = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1:]
                last = json.loads(tail)
                self._file_id, self._file_hash = int(last["id"]), str(last["hash"])
        except (OSError, AuditError) as exc:
            self._failed(exc)
            return False
        finally:
            if locked and self._file is not None:
                _flock(self._file, fcntl.LOCK_UN)
        if not self._healthy:
            log.warning("audit: writing to %s works again", self.config.path)
        self._healthy = True
        self.last_error = None
        self._maybe_rotate()
        return True

    def _append_fast(self, batch: list[tuple[bytes, str, float, Any, Any]]) -> bool:
        """The usual write of a batch, in one C call without the GIL (`_auditline.append`): the
        file is the one we wrote last, as long as we left it and its last event the batch's
        `prev`. False when it is not (or there is no file, or no C helper): nothing is
        written, and _write takes the general way (lock, re-read, re-chain). Raises OSError."""
        f = self._file
        if f is None or _c_append is None or batch[0][1] != self._file_hash:
            return False
        assert self.config.path is not None
        data = b"".join([item[0] for item in batch])
        sync = self.config.fsync == "every" or (self.config.fsync == "interval"
                                                and self._fsync_due())
        size = _c_append(f.fileno(), os.fsencode(self.config.path), data, self._size, sync)
        if size < 0:
            return False
        self._size = size
        if sync:
            self._synced()
        else:
            self._dirty = True
        return True

    def _rebase(self, batch: list[tuple[bytes, str, float, Any, Any]]) -> None:
        """The file does not end where the batch's chain starts (another process appended, or
        the file was replaced): chain the batch again from the file's last event, with every
        event emitted since (taken from `_pending`, so the emitters continue from the new
        head), under the chain lock. Rare; ids are re-assigned in order (EventRefs follow),
        and a statement that points at a re-chained event gets its new id."""
        with self._chain_lock:
            batch += self._pending
            self._pending = []
            self._last_id, self._last_hash = self._file_id, self._file_hash
            renumbered: dict[int, int] = {}  # old id -> new id of the events re-chained
            for i, (old, _, ts, event, fields) in enumerate(batch):
                prev = self._last_hash
                if event is _FAST_STATEMENT:
                    line = self._rechain_line(old, renumbered)
                elif event is _FAST_BLOCK:
                    line = b"".join([self._rechain_line(one, renumbered)
                                     for one in old.splitlines(keepends=True)])
                else:
                    line = self._chain(ts, event, dict(fields))
                    renumbered[json.loads(old)["id"]] = self._last_id
                batch[i] = (line, prev, ts, event, fields)
            self._held = _events(batch)

    def _rechain_line(self, line: bytes, renumbered: dict[int, int]) -> bytes:
        """A statement event's line chained again (`_rebase`): the event read back from its
        line, with the next id and prev, and its stepup_event's new id if that event was
        re-chained too. The canonical JSON of the line read back is its own text, so this is
        the line `_chain_statement` would make for the same event now."""
        record = json.loads(line)
        del record["hash"]
        stepup = record.get("stepup_event")
        if type(stepup) is int and stepup in renumbered:
            record["stepup_event"] = renumbered[stepup]
        rid = self._last_id + 1
        renumbered[record["id"]] = rid
        record["id"] = rid
        record["prev"] = self._last_hash
        return self._seal(rid, record)

    def _chain(self, ts: float, event: str, fields: dict[str, Any]) -> bytes:
        """One line of the trail. The canonical JSON of the event without `hash` is both what
        is hashed and the line itself, with `hash` appended: one serialisation per event."""
        if event == STATEMENT:
            _statement_fields(fields, self.config.include_literals, self._derived)
        rid = self._last_id + 1
        record: dict[str, Any] = {"id": rid, "ts": self._format_ts(ts), "event": event}
        ref = fields.get("_ref")
        if ref is not None:
            ref.id = rid  # later events that point at this one read it (chained after it)
        for k, v in fields.items():
            if k not in _RESERVED:
                record[k] = v if type(v) in _PLAIN else _jsonable(v)
        record["prev"] = self._last_hash
        return self._seal(rid, record)

    def _seal(self, rid: int, record: dict[str, Any]) -> bytes:
        """The line of `record` (id `rid`, prev the chain's head), which becomes the head."""
        return self._sealed_body(rid, canonical_json(record))

    def _chain_statement(self, ts: float, args: tuple[Any, ...]) -> bytes:
        """`_chain` of an `emit_statement` event: the same bytes, from a template."""
        (session, user, client_addr, c, decision, rule, duration, rows, error,
         stepup) = args
        if type(stepup) is EventRef:
            stepup = stepup.id
        has_rows, has_error, has_stepup = rows is not None, error is not None, stepup is not None
        hit = self._templates.cache.get((id(c), session, user, client_addr, decision, rule,
                                         has_rows, has_error, has_stepup))
        parts = hit[1] if hit is not None and hit[0] is c else self._templates.get(
            self, c, session, user, client_addr, decision, rule, has_rows, has_error,
            has_stepup)
        if parts is None:  # a value the template cannot hold: the general path
            fields: dict[str, Any] = {
                "session": session, "user": user, "client_addr": client_addr,
                "classification": c, "decision": decision, "rule": rule,
                "duration": statement_duration(duration)}
            for k, v in (("rows", rows), ("error", error), ("stepup_event", stepup)):
                if v is not None:
                    fields[k] = v
            return self._chain(ts, STATEMENT, fields)
        if has_rows and not has_error and not has_stepup:
            return self._usual_line(parts, duration, rows, ts)
        rid = self._last_id + 1
        ts_text = self._format_ts(ts).encode()
        # The variable values in sorted-key order (_Templates.SLOTS): duration, error, id,
        # prev, rows, stepup_event, ts; each as its JSON, between the template's parts.
        values: list[bytes] = [self._durations.text(duration)]
        if error is not None:
            values.append(json.dumps(error, ensure_ascii=False).encode("utf-8"))
        values.append(b"%d" % rid)
        values.append(self._last_hash.encode())
        if rows is not None:
            values.append(b"%d" % int(rows))
        if stepup is not None:
            values.append(json.dumps(_jsonable(stepup), ensure_ascii=False).encode("utf-8"))
        values.append(ts_text)
        pieces = [parts[0]]
        for value, part in zip(values, parts[1:], strict=True):
            pieces.append(value)
            pieces.append(part)
        body = b"".join(pieces)
        return self._sealed_body(rid, body)

    def _usual_line(self, parts: tuple[bytes, ...], duration: float, rows: int,
                    ts: float) -> bytes:
        """The line of the usual statement event (rows, no error, no step-up) from its
        template, chained at the head: in C when the helper is built and takes the values."""
        rid = self._last_id + 1
        if self._lines is not None:  # the same bytes as below, made in C
            line = self._lines.line(parts, duration, rid, self._last_hash, rows, ts)
            if line is not None:
                self._last_id = rid
                self._last_hash = self._lines.digest
                return line
        body = b"".join((parts[0], self._durations.text(duration), parts[1], b"%d" % rid,
                         parts[2], self._last_hash.encode(), parts[3], b"%d" % int(rows),
                         parts[4], self._format_ts(ts).encode(), parts[5]))
        return self._sealed_body(rid, body)

    def _sealed_body(self, rid: int, body: bytes) -> bytes:
        """The line of an event's canonical JSON `body` (id `rid`, prev the chain's head),
        which becomes the head."""
        h = _SHA256.copy()  # no digest lookup per event (OpenSSL 3 fetches it per new hash)
        h.update(body)
        digest = h.hexdigest()
        self._last_id = rid
        self._last_hash = digest
        return b"".join((body[:-1], b',"hash":"', digest.encode(), b'"}\n'))

    def _format_ts(self, ts: float) -> str:
        """format_ts(), with the whole-second part cached (events come many per second)."""
        micros = round(ts * 1e6)
        sec = micros // 1_000_000
        us = micros - sec * 1_000_000
        if sec != self._ts_sec:
            self._ts_sec = sec
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        return self._ts_prefix + _DIGITS3[us // 1000] + _DIGITS3[us % 1000] + "Z"

    def _failed(self, exc: Exception) -> None:
        self._errors += 1
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.last_error = f"{self.config.path}: {reason}"
        if self._healthy:
            log.error("audit: cannot write the audit trail: %s", self.last_error)
        self._healthy = False
        self._close_file()
        self._needs_reopen = True
        if self._on_error is not None:
            with contextlib.suppress(Exception):
                self._on_error()

    def _resume_chain(self) -> None:
        assert self.config.path is not None
        _truncate_partial_line(self.config.path)
        last = last_event(self.config.path)
        if last is not None:
            self._file_id = int(last["id"])
            self._file_hash = str(last["hash"])

    def _open(self) -> None:
        assert self.config.path is not None
        self._close_file()
        self.config.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.config.path, "ab")  # owned by the sink until _close_file
        try:
            # After a failed write the file may end in half a line, or have been replaced: pick
            # the chain up from what is actually on disk (under the lock: see _lock_for_append).
            _flock(f, fcntl.LOCK_EX)
            self._resume_chain()
            self._size = os.fstat(f.fileno()).st_size
            _flock(f, fcntl.LOCK_UN)
        except BaseException:
            f.close()
            raise
        self._file = f
        self._needs_reopen = False
        self._last_fsync = time.monotonic()

    def _lock_for_append(self) -> None:
        """Other processes append to the same trail (`pgguard enroll` writes its `enroll` event
        while the proxy runs), so every writer holds the file's flock while it chains and
        writes, and first makes sure it continues the file as it is now: re-opened if it was
        rotated away, the chain re-read if another process appended since our last write.
        The caller unlocks (closing the file does too)."""
        assert self.config.path is not None
        for _ in range(5):
            f = self._file
            assert f is not None
            _flock(f, fcntl.LOCK_EX)
            mine = os.fstat(f.fileno())
            try:
                current = os.stat(self.config.path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino,
                                                                            mine.st_dev):
                if mine.st_size != self._size:
                    self._resume_chain()
                    self._size = os.fstat(f.fileno()).st_size
                return
            self._open()  # rotated by another writer: closing releases the old file's lock
        raise AuditError("the audit file keeps being replaced")

    def _fsync(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
        self._synced()

    def _synced(self) -> None:
        self._dirty = False
        self._last_fsync = time.monotonic()

    def _fsync_due(self) -> bool:
        return time.monotonic() - self._last_fsync >= self.config.fsync_interval

    def _fsync_if_due(self) -> None:
        if self._fsync_due():
            try:
                self._fsync()
            except OSError as exc:
                self._failed(exc)

    def _maybe_rotate(self) -> None:
        path, limit = self.config.path, self.config.rotate_bytes
        if path is None or self._file is None or limit <= 0 or self._size < limit:
            return
        try:
            self._fsync()
            # Rename under the lock: a writer waiting for it then sees the path moved on.
            _flock(self._file, fcntl.LOCK_EX)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
            target = path.with_name(f"{path.name}.{stamp}")
            n = 0
            while target.exists():
                n += 1
                target = path.with_name(f"{path.name}.{stamp}.{n}")
            os.rename(path, target)
            self._close_file()
            # The new file starts empty (created now, so `tail --follow` finds it); its first
            # event's prev is our last hash (found in the newest rotated file after a restart).
            self._needs_reopen = True
            self._open()
        except (OSError, AuditError) as exc:
            self._failed(exc)

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                if self._dirty:
                    os.fsync(f.fileno())
                    self._dirty = False
            with contextlib.suppress(OSError):
                f.close()


def _flock(f: IO[bytes], op: int) -> None:
    """Best effort: a file system without flock only loses the guard against other writers."""
    with contextlib.suppress(OSError):
        fcntl.flock(f.fileno(), op)


def iter_events(lines: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    """Parse JSON lines into events, skipping blank lines."""
    for line in lines:
        if line.strip():
            yield json.loads(line)
