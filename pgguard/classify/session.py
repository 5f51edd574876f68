"""Per-session facts the classifier needs (CLASSIFICATION §1, §3, §10).

One `SessionFacts` belongs to one client session and is mutated only by that session's owner
(the proxy), never shared. `classify()` reads it and never writes it: the changes a message makes
(PREPARE/DECLARE record a name, DEALLOCATE/CLOSE/DISCARD forget names) come back in
`Classification.session_changes`, and the owner applies them with `apply()` once it has decided
to forward the message, so a denied PREPARE never records anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pgguard.classify.classes import StatementClass, parse_classes


class ChangeKind(StrEnum):
    PREPARE = "prepare"        # name → classes (SQL PREPARE or a protocol Parse of a named stmt)
    DECLARE = "declare"        # cursor name → classes
    DEALLOCATE = "deallocate"  # forget one prepared statement (name None: all)
    CLOSE = "close"            # forget one cursor (name None: all)
    DISCARD_ALL = "discard_all"


@dataclass(frozen=True, slots=True)
class SessionChange:
    kind: ChangeKind
    name: str | None = None
    classes: frozenset[StatementClass] = frozenset()


@dataclass(slots=True)
class SessionFacts:
    """Prepared statements and cursors by (normalised) name with their classes, and the
    session's `standard_conforming_strings` (from ParameterStatus; off makes any backslash
    UNKNOWN, because sqlglot lexes strings as if it were on)."""

    prepared: dict[str, frozenset[StatementClass]] = field(default_factory=dict)
    cursors: dict[str, frozenset[StatementClass]] = field(default_factory=dict)
    standard_conforming_strings: bool = True

    def apply(self, changes: Iterable[SessionChange]) -> None:
        """Apply `Classification.session_changes` (in order) after forwarding the message."""
        for ch in changes:
            if ch.kind is ChangeKind.PREPARE and ch.name is not None:
                self.prepared[ch.name] = ch.classes
            elif ch.kind is ChangeKind.DECLARE and ch.name is not None:
                self.cursors[ch.name] = ch.classes
            elif ch.kind is ChangeKind.DEALLOCATE:
                if ch.name is None:
                    self.prepared.clear()
                else:
                    self.prepared.pop(ch.name, None)
            elif ch.kind is ChangeKind.CLOSE:
                if ch.name is None:
                    self.cursors.clear()
                else:
                    self.cursors.pop(ch.name, None)
            elif ch.kind is ChangeKind.DISCARD_ALL:
                self.prepared.clear()
                self.cursors.clear()

    def record_prepared(self, name: str, classes: Iterable[StatementClass]) -> None:
        """A protocol-level Parse of a named statement shares PREPARE's namespace: record it."""
        self.prepared[name] = frozenset(classes)

    def forget_prepared(self, name: str) -> None:
        """Close(S, name) at protocol level."""
        self.prepared.pop(name, None)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> SessionFacts:
        """From the corpus header's `session:` shape."""
        data = data or {}
        scs = data.get("standard_conforming_strings", "on")
        return cls(
            prepared={str(k): parse_classes(v) for k, v in
                      (data.get("prepared_statements") or {}).items()},
            cursors={str(k): parse_classes(v) for k, v in (data.get("cursors") or {}).items()},
            standard_conforming_strings=str(scs).lower() not in ("off", "false", "0"),
        )
