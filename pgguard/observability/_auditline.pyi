# The C helper's interface (_auditline.pyx), for mypy: it exists only when setup.py built it.

from pgguard.observability._usual import UsualEvents

class StatementLines:
    digest: str  # the hash of the last line made

    def line(self, parts: tuple[bytes, ...], duration: float, rid: int, prev: str, rows: int,
             ts: float) -> bytes | None: ...

    def block(self, events: UsualEvents, start: int, rid: int, prev: str) -> tuple[bytes, int]: ...

def append(fd: int, path: bytes, data: bytes, size: int, sync: bool) -> int: ...
