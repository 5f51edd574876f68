"""Step-up grants as the relay reads them: synchronous, in memory, per session and per
(user, client address) for `stepup.scope: client` (DESIGN §6).

The state store keeps the durable copy (grants survive a restart: a client-scope grant covers
the user's new connections from the same address); this book is the hot-path view, filled from
the store at start and on every successful step-up, so a decision never awaits I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pgguard.classify import StatementClass

__all__ = ["GrantBook"]

ClassGrants = dict[StatementClass, float]


class GrantBook:
    def __init__(self) -> None:
        self._by_session: dict[str, ClassGrants] = {}
        self._by_client: dict[tuple[str, str], ClassGrants] = {}

    def for_session(self, session_id: str, user: str, client_addr: str,
                    now: float) -> ClassGrants:
        """Unexpired grants covering this session (its own and its client's)."""
        out: ClassGrants = {}
        for source in (self._by_session.get(session_id), self._by_client.get((user, client_addr))):
            if source:
                for cls, until in source.items():
                    if until > now and until > out.get(cls, 0.0):
                        out[cls] = until
        return out

    def add(self, session_ids: Iterable[str], user: str, client_addr: str | None,
            grants: Mapping[StatementClass, float]) -> None:
        """Record grants for sessions, and for (user, client_addr) when the scope is client.
        A grant is only ever extended."""
        targets = [self._by_session.setdefault(sid, {}) for sid in session_ids]
        if client_addr is not None:
            targets.append(self._by_client.setdefault((user, client_addr), {}))
        for book in targets:
            for cls, until in grants.items():
                if until > book.get(cls, 0.0):
                    book[cls] = until

    def drop_session(self, session_id: str) -> None:
        self._by_session.pop(session_id, None)

    def prune(self, now: float) -> None:
        for sid in list(self._by_session):
            if not _prune(self._by_session[sid], now):
                del self._by_session[sid]
        for client in list(self._by_client):
            if not _prune(self._by_client[client], now):
                del self._by_client[client]


def _prune(grants: ClassGrants, now: float) -> bool:
    """Drop expired entries in place; True if any remain."""
    for cls in [c for c, until in grants.items() if until <= now]:
        del grants[cls]
    return bool(grants)
