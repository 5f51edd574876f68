"""Cancel keys pgguard issues to its clients, and where they lead.

Every client gets a BackendKeyData of pgguard's own (DESIGN §3): a CancelRequest with it cancels
that session's held statement, or is forwarded upstream with the real key while something is in
flight. The mapping key → session is cross-session state, so it sits behind this small interface
(a later shared store can implement it for several processes).
"""

from __future__ import annotations

import hmac
import secrets
from typing import Protocol

__all__ = ["CancelRegistry", "Cancellable", "LocalCancelRegistry"]


class Cancellable(Protocol):
    def cancel_requested(self) -> None: ...


class CancelRegistry(Protocol):
    def issue(self, session: Cancellable, secret_len: int) -> tuple[int, bytes]: ...
    def lookup(self, pid: int, secret: bytes) -> Cancellable | None: ...
    def release(self, pid: int) -> None: ...


class LocalCancelRegistry:
    """In-process registry: pid → (secret, session)."""

    def __init__(self) -> None:
        self._keys: dict[int, tuple[bytes, Cancellable]] = {}

    def issue(self, session: Cancellable, secret_len: int) -> tuple[int, bytes]:
        while True:
            pid = secrets.randbelow(0x7FFFFFFF - 1) + 1  # positive, like a real backend pid
            if pid not in self._keys:
                break
        secret = secrets.token_bytes(secret_len)
        self._keys[pid] = (secret, session)
        return pid, secret

    def lookup(self, pid: int, secret: bytes) -> Cancellable | None:
        entry = self._keys.get(pid)
        if entry is None or not hmac.compare_digest(entry[0], secret):
            return None
        return entry[1]

    def release(self, pid: int) -> None:
        self._keys.pop(pid, None)

    def __len__(self) -> int:
        return len(self._keys)
