"""The PII rule file: the `pii:` section of pgguard.yaml (CLASSIFICATION §6, DESIGN §5).

    pii:
      tables: {public.users: [email, phone, ssn], public.customers: "*"}
      functions: [public.get_user_email]

A column rule marks columns; `"*"` is a table-level rule (any reference to the relation is PII).
Names follow PostgreSQL: unquoted folds to lower case, quoted is exact; an unqualified table name
in the config means `public.<name>`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgguard.classify.names import QualName, qualname_from_config, render, split_config_name


@dataclass(frozen=True, slots=True)
class TableRule:
    """`columns` None = table-level rule (`"*"`)."""

    table: QualName
    columns: frozenset[str] | None

    def describe(self) -> str:
        if self.columns is None:
            return f"{render(self.table)}: '*'"
        return f"{render(self.table)}: [{', '.join(sorted(self.columns))}]"


@dataclass(frozen=True, slots=True)
class PiiRules:
    """Validated, normalised PII rules. `version` is a digest of the content: it is part of the
    classification cache's epoch, so a hot reload of changed rules invalidates the cache and an
    unchanged reload does not."""

    tables: Mapping[QualName, TableRule] = field(default_factory=dict)
    functions: frozenset[QualName] = frozenset()
    version: str = "empty"
    # Per-instance memo of the PII model derived from these rules and one catalog snapshot
    # (views resolved against the rules): building it classifies every view definition.
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)

    @classmethod
    def from_config(cls, pii: Mapping[str, Any] | None) -> PiiRules:
        """From `Config.pii` (or the corpus header's `pii`). Raises ValueError on a bad name."""
        pii = pii or {}
        tables: dict[QualName, TableRule] = {}
        for name, cols in (pii.get("tables") or {}).items():
            qn = qualname_from_config(str(name))
            if cols == "*":
                tables[qn] = TableRule(qn, None)
            else:
                colset = set()
                for c in cols:
                    parts = split_config_name(str(c))
                    if len(parts) != 1:
                        raise ValueError(f"{name}: bad column name {c!r}")
                    colset.add(parts[0])
                prev = tables.get(qn)
                if prev is not None and prev.columns is None:
                    continue
                if prev is not None and prev.columns is not None:
                    colset |= prev.columns
                tables[qn] = TableRule(qn, frozenset(colset))
        functions = frozenset(qualname_from_config(str(f)) for f in (pii.get("functions") or []))
        canon = json.dumps({"t": sorted((render(k), sorted(v.columns) if v.columns is not None
                                         else "*") for k, v in tables.items()),
                            "f": sorted(render(f) for f in functions)}, sort_keys=True)
        version = hashlib.sha256(canon.encode()).hexdigest()[:16]
        return cls(tables=tables, functions=functions, version=version)
