"""`ClassificationCache`: the hot-path entry point (CLASSIFICATION §10, DESIGN §4).

Keyed by the exact statement text (no normalisation: what is classified must be what
PostgreSQL parses) plus the session's `standard_conforming_strings` and whether the text came
from a Parse (one statement allowed). The epoch — rules version, catalog version — is not in the
key: `update()` with a different epoch empties the cache instead, so a hit is one dict lookup.
Bounded LRU by entries and by total characters; UNKNOWN is cached too; session-dependent
results (EXECUTE, FETCH, MOVE) never are.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pgguard.classify.catalog import CatalogSnapshot
from pgguard.classify.classifier import Classification, classify
from pgguard.classify.rules import PiiRules
from pgguard.classify.session import SessionFacts

_Key = tuple[str, bool, bool]


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    chars: int
    epoch: tuple[str, str]


class ClassificationCache:
    """One per process (or per database of `catalog.dsn`), shared by all sessions; owned by the
    composition root. Not thread-safe: call it from the event loop thread."""

    __slots__ = ("_catalog", "_chars", "_entries", "_rules", "epoch_cell", "hits", "max_chars",
                 "max_entries", "max_sql_bytes", "misses")

    def __init__(self, rules: PiiRules, catalog: CatalogSnapshot | None = None, *,
                 max_entries: int = 10_000, max_chars: int = 32 << 20,
                 max_sql_bytes: int | None = None) -> None:
        self._rules = rules
        self._catalog = catalog
        # [(rules version, catalog version)]: the epoch in a one-item list that sessions keep
        # and read at every Bind (a C list read when compiled, where an attribute of this
        # object is a lookup); only update() changes rules and catalog, and it sets it again.
        self.epoch_cell = [_epoch(rules, catalog)]
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.max_sql_bytes = max_sql_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[_Key, Classification] = OrderedDict()
        self._chars = 0

    @property
    def epoch(self) -> tuple[str, str]:
        """The rules and catalog versions; a new object only when they change (compare by
        `is`)."""
        return self.epoch_cell[0]

    @property
    def rules(self) -> PiiRules:
        return self._rules

    @property
    def catalog(self) -> CatalogSnapshot | None:
        return self._catalog

    def update(self, rules: PiiRules | None = None,
               catalog: CatalogSnapshot | None = None) -> bool:
        """New rules (hot reload) and/or a refreshed catalog. Clears the cache when the epoch
        changes; returns whether it did."""
        if rules is not None:
            self._rules = rules
        if catalog is not None:
            self._catalog = catalog
        epoch = _epoch(self._rules, self._catalog)
        if epoch != self.epoch:  # a new object only when it changes: sessions compare by `is`
            self.epoch_cell[0] = epoch
            self.clear()
            return True
        return False

    def clear(self) -> None:
        self._entries.clear()
        self._chars = 0

    def lookup(self, sql: str, session: SessionFacts | None = None,
               parse_message: bool = False) -> Classification | None:
        """The cached classification (counted as a hit), or None: `classify()` would parse.
        Lets the caller time only the misses (pgguard_classify_seconds)."""
        key = (sql, session.standard_conforming_strings if session is not None else True,
               parse_message)
        hit = self._entries.get(key)
        if hit is not None:
            self.hits += 1
            self._entries.move_to_end(key)
        return hit

    def classify(self, sql: str, session: SessionFacts | None = None, *,
                 parse_message: bool = False) -> Classification:
        """Classify `sql` for `session` (a Query string, or a Parse's text with
        `parse_message=True`). The caller applies `result.session_changes` to its
        `SessionFacts` once it forwards the message."""
        hit = self.lookup(sql, session, parse_message)
        if hit is not None:
            return hit
        self.misses += 1
        result = classify(sql, self._rules, self._catalog, session,
                          max_sql_bytes=self.max_sql_bytes, single_statement=parse_message)
        self.put(sql, session, parse_message, result)
        return result

    def put(self, sql: str, session: SessionFacts | None, parse_message: bool,
            result: Classification) -> None:
        """Remember a classification made elsewhere (a worker process, for long statements)."""
        if result.session_dependent or len(sql) > self.max_chars:
            return
        key = (sql, session.standard_conforming_strings if session is not None else True,
               parse_message)
        if key not in self._entries:
            self._chars += len(sql)
        self._entries[key] = result
        while len(self._entries) > self.max_entries or self._chars > self.max_chars:
            old_key, _ = self._entries.popitem(last=False)
            self._chars -= len(old_key[0])

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, len(self._entries), self._chars, self.epoch)

    def __len__(self) -> int:
        return len(self._entries)


def _epoch(rules: PiiRules, catalog: CatalogSnapshot | None) -> tuple[str, str]:
    return (rules.version, catalog.version if catalog is not None else "-")
