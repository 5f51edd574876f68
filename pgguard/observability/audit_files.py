"""Reading the audit trail: `pgguard audit verify` (the hash chain) and `pgguard audit tail`.

Verification recomputes every line's hash from its canonical JSON (`audit.chain_hash`) and
checks that each `prev` is the hash of the line before and each `id` the one after. The first
line of the first file given is trusted as a starting point (a rotated file verifies on its own
from its first `prev`); across files, each file must start where the one before ended, so a
series is verified in the order given (oldest first, as `rotated_files()` lists them).

What a chain cannot show: lines cut off at the very end of the newest file, or at the very start
of the first file given when that file is verified alone (keep the last hash somewhere else, e.g.
the log, if that matters).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pgguard.observability.audit import GENESIS, chain_hash, rotated_files

__all__ = ["VerifyResult", "follow_lines", "format_event", "matches", "tail", "verify_files"]

# Fields shown in the head of a tail line; everything else follows as key=value.
_HEAD = ("id", "ts", "event", "user", "client_addr", "session", "prev", "hash")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    events: int
    error: str | None = None  # `FILE:LINE: why` for the first bad line

    def message(self) -> str:
        return f"ok {self.events} events" if self.ok else str(self.error)


def verify_files(paths: Sequence[Path]) -> VerifyResult:
    """Verify one file or a series of files (in order). Stops at the first bad line."""
    state = _Chain()
    for path in paths:
        try:
            f = path.open("rb")
        except OSError as exc:
            return VerifyResult(False, state.count, f"{path}: cannot read: {exc.strerror or exc}")
        with f:
            for lineno, line in enumerate(f, 1):
                why = state.check(line, first_of_file=lineno == 1)
                if why is not None:
                    return VerifyResult(False, state.count, f"{path}:{lineno}: {why}")
        state.where = str(path)
    return VerifyResult(True, state.count)


@dataclass(slots=True)
class _Chain:
    prev_hash: str | None = None
    prev_id: int | None = None
    where: str = ""  # the file before this one
    count: int = 0

    def check(self, line: bytes, *, first_of_file: bool) -> str | None:
        """Why `line` breaks the chain, or None (and the chain moves on)."""
        if not line.endswith(b"\n"):
            return "incomplete last line (no newline)"
        try:
            event = json.loads(line)
        except ValueError:
            return "not a JSON object"
        if not isinstance(event, dict):
            return "not a JSON object"
        eid, h, prev = event.get("id"), event.get("hash"), event.get("prev")
        if not isinstance(eid, int) or not isinstance(h, str) or not isinstance(prev, str):
            return "missing id, prev or hash"
        if chain_hash(event) != h:
            return "hash does not match the line's content (the line was edited)"
        if self.prev_hash is not None and prev != self.prev_hash:
            if first_of_file:
                return (f"prev does not match the last hash of {self.where} (a file is missing "
                        f"or the files are out of order)")
            return ("prev does not match the hash of the line before (a line was removed, "
                    "inserted or reordered)")
        if self.prev_hash is None and prev == GENESIS and eid != 1:
            return f"first event of the trail has id {eid}, not 1"
        if self.prev_id is not None and eid != self.prev_id + 1:
            return f"id {eid} does not follow {self.prev_id} (a line was removed, inserted or reordered)"
        self.prev_hash, self.prev_id = h, eid
        self.count += 1
        return None


# -- tail ----------------------------------------------------------------------------------------


def matches(event: dict[str, Any], users: Iterable[str], events: Iterable[str]) -> bool:
    """`--user` exact; `--event` exact or a dotted prefix (`stepup` matches `stepup.failure`)."""
    users, events = list(users), list(events)
    if users and event.get("user") not in users:
        return False
    if events:
        name = str(event.get("event", ""))
        return any(name == e or name.startswith(e + ".") for e in events)
    return True


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(_value(x) for x in v) or "-"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False) if (not v or any(c in v for c in " \"=")) else v
    return json.dumps(v, ensure_ascii=False)


def format_event(event: dict[str, Any]) -> str:
    """One line for humans: `2025-01-31 12:00:00.123456Z #42 statement alice@10.0.0.7:5123
    session=7hq3kzm4w2xa decision=allowed classes=pii,read …` (no hashes)."""
    ts = str(event.get("ts", "")).replace("T", " ")
    who = str(event.get("user") or "")
    if event.get("client_addr"):
        who = f"{who}@{event['client_addr']}"
    parts = [ts, f"#{event.get('id', '?')}", str(event.get("event", "?"))]
    if who:
        parts.append(who)
    if event.get("session"):
        parts.append(f"session={event['session']}")
    parts += [f"{k}={_value(v)}" for k, v in event.items() if k not in _HEAD]
    return " ".join(parts)


def follow_lines(path: Path, *, follow: bool, poll: float = 0.5) -> Iterator[bytes]:
    """The complete lines of `path`. With `follow`, yield `b""` each time the end is reached
    (so the caller knows it has caught up), then keep yielding new lines as they are written.
    When the file is rotated (a new inode at `path`, or none yet), the rest of the old file comes
    first, then any rotated file we never saw (created and rotated between two polls), then the
    new file."""
    f: IO[bytes] | None = path.open("rb")
    assert f is not None
    inode = os.fstat(f.fileno()).st_ino
    seen: set[int | None] = {inode, *(_inode(p) for p in rotated_files(path))}
    try:
        while True:
            if f is not None:
                yield from _complete_lines(f)
            if not follow:
                return
            yield b""
            if f is not None and _inode(path) == inode:
                time.sleep(poll)
                continue
            if f is not None:  # rotated: what was written to the old file after our last read
                yield from _complete_lines(f)
                f.close()
                f = None
            yield from _unseen_rotated(path, seen)
            try:
                f = path.open("rb")
            except FileNotFoundError:  # the next file is not there yet
                time.sleep(poll)
                continue
            inode = os.fstat(f.fileno()).st_ino
            seen.add(inode)
            # A rotation between the scan and the open: those lines come before f's.
            yield from _unseen_rotated(path, seen)
    finally:
        if f is not None:
            f.close()


def _complete_lines(f: IO[bytes]) -> Iterator[bytes]:
    """Complete lines from the current position; a trailing partial line is left unread."""
    while True:
        pos = f.tell()
        line = f.readline()
        if not line.endswith(b"\n"):
            f.seek(pos)
            return
        yield line


def _unseen_rotated(path: Path, seen: set[int | None]) -> Iterator[bytes]:
    for missed in rotated_files(path):
        ino = _inode(missed)
        if ino is not None and ino not in seen:
            seen.add(ino)
            with missed.open("rb") as m:
                yield from (line for line in m if line.endswith(b"\n"))


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def tail(path: Path, *, follow: bool, users: Iterable[str] = (), events: Iterable[str] = (),
         last: int | None = None, out: Callable[[str], None] = print) -> None:
    """`pgguard audit tail`: matching events of `path`, formatted; `last` keeps only the last N
    of what is already there; `follow` then waits for more."""
    users, events = list(users), list(events)
    backlog: deque[str] | None = deque(maxlen=last) if last is not None else None

    def render(raw: bytes) -> str | None:
        try:
            event = json.loads(raw)
        except ValueError:
            return f"? {raw.decode('utf-8', 'replace').rstrip()}"
        if not isinstance(event, dict) or not matches(event, users, events):
            return None
        return format_event(event)

    for raw in follow_lines(path, follow=follow):
        if not raw:  # caught up with what was there
            if backlog is not None:
                for shown in backlog:
                    out(shown)
                backlog = None
            continue
        text = render(raw)
        if text is None:
            continue
        if backlog is not None:
            backlog.append(text)
        else:
            out(text)
    for shown in backlog or ():
        out(shown)
