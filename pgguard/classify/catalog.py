"""The catalog snapshot the classifier may use (CLASSIFICATION §6, §11; DESIGN §4).

Plain data, built either by `pgguard.state.catalog.load_catalog()` from a live database
(schema-aware mode) or from a mapping such as the corpus header's `catalog:` section. Everything
is keyed by normalised `(schema, name)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pgguard.classify.names import QualName, qualname_from_config, split_config_name

DEFAULT_COMMENT_TAG = "pgguard:pii"


class Volatility(StrEnum):
    """pg_proc.provolatile."""

    IMMUTABLE = "immutable"
    STABLE = "stable"
    VOLATILE = "volatile"

    @classmethod
    def from_provolatile(cls, code: str) -> Volatility:
        return {"i": cls.IMMUTABLE, "s": cls.STABLE}.get(code, cls.VOLATILE)


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """What pgguard knows about one database.

    - `relations`: every table, view, materialized view (and foreign/partitioned table) with its
      columns in order;
    - `views`: view and materialized-view definitions (`pg_get_viewdef`), analysed for PII;
    - `functions`: user functions (schemas other than pg_catalog/information_schema) with their
      volatility; a name overloaded with several volatilities keeps the most volatile;
    - `column_comments`: comments of columns, `(relation, column) → text`; a comment containing
      `comment_tag` makes the column PII without a config rule;
    - `version`: changes whenever the content changes (part of the cache epoch).
    """

    relations: Mapping[QualName, tuple[str, ...]] = field(default_factory=dict)
    views: Mapping[QualName, str] = field(default_factory=dict)
    materialized_views: frozenset[QualName] = frozenset()
    functions: Mapping[QualName, Volatility] = field(default_factory=dict)
    procedures: frozenset[QualName] = frozenset()
    column_comments: Mapping[tuple[QualName, str], str] = field(default_factory=dict)
    comment_tag: str = DEFAULT_COMMENT_TAG
    version: str = "0"

    def tagged_columns(self) -> dict[QualName, frozenset[str]]:
        """Columns whose comment carries the tag, by relation."""
        out: dict[QualName, set[str]] = {}
        if not self.comment_tag:
            return {}
        for (rel, col), text in self.column_comments.items():
            if self.comment_tag in text:
                out.setdefault(rel, set()).add(col)
        return {k: frozenset(v) for k, v in out.items()}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], version: str = "mapping") -> CatalogSnapshot:
        """From the corpus header's `catalog:` shape: `tables: {s.t: [cols]}`, `views: {s.v: sql}`,
        `materialized_views: [s.v]`, `functions: {s.f: volatility}`, `procedures: [s.p]`,
        `column_comments: {s.t.c: text}`, `comment_tag`."""
        relations = {qualname_from_config(k): tuple(_col(c) for c in v)
                     for k, v in (data.get("tables") or {}).items()}
        views = {qualname_from_config(k): str(v) for k, v in (data.get("views") or {}).items()}
        for v in views:
            relations.setdefault(v, ())
        comments: dict[tuple[QualName, str], str] = {}
        for k, text in (data.get("column_comments") or {}).items():
            parts = split_config_name(str(k))
            if len(parts) != 3:
                raise ValueError(f"column comment key must be schema.table.column: {k!r}")
            comments[((parts[0], parts[1]), parts[2])] = str(text)
        return cls(
            relations=relations,
            views=views,
            materialized_views=frozenset(qualname_from_config(v) for v in
                                         data.get("materialized_views") or []),
            functions={qualname_from_config(k): Volatility(str(v).lower())
                       for k, v in (data.get("functions") or {}).items()},
            procedures=frozenset(qualname_from_config(p) for p in data.get("procedures") or []),
            column_comments=comments,
            comment_tag=str(data.get("comment_tag") or DEFAULT_COMMENT_TAG),
            version=version,
        )


def _col(name: Any) -> str:
    parts = split_config_name(str(name))
    return parts[0]
