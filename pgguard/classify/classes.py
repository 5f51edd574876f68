"""The classes a statement can carry (CLASSIFICATION.md §1, DESIGN §4)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class StatementClass(StrEnum):
    """One class of a statement. A statement carries a set of them; a message the union.

    `tx` is CLASSIFICATION.md's TRANSACTION_CONTROL: session and transaction control that moves
    no data and changes no privilege. `unknown` means "could not be classified with certainty";
    policy treats it as the most sensitive class.
    """

    READ = "read"
    WRITE = "write"
    DDL = "ddl"
    ADMIN = "admin"
    PII = "pii"
    TX = "tx"
    UNKNOWN = "unknown"


# The classes that stop a query from being a plain READ (§1: READ = query and no such effect).
EFFECT_CLASSES: frozenset[StatementClass] = frozenset(
    {StatementClass.WRITE, StatementClass.DDL, StatementClass.ADMIN})


def class_names(classes: Iterable[StatementClass]) -> list[str]:
    """Sorted alphabetically by value, as `pgguard explain --json` prints them (DESIGN §8)."""
    return sorted(c.value for c in classes)


def parse_classes(values: Iterable[str]) -> frozenset[StatementClass]:
    """`["read", "pii"]` → classes; a name outside the enum raises ValueError."""
    return frozenset(StatementClass(v) for v in values)
