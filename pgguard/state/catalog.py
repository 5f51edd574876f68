"""The catalog loader for schema-aware classification (CLASSIFICATION §11, DESIGN §4).

`load_catalog(dsn, comment_tag)` reads one `CatalogSnapshot` from the database named in
`catalog.dsn`: relations with their columns, view and materialized-view definitions, user
functions with their volatility, procedures, and column comments. The owner of the running proxy
calls it at start-up, every `catalog.refresh` and on SIGHUP, then:

    problems = validate_rules(rules, new)          # rule relations/columns missing: log + metric
    changes = diff_pii_columns(rules, old, new)    # PII columns renamed or dropped since `old`
    cache.update(catalog=new)                      # bumps the classification cache's epoch

A failed refresh keeps the old snapshot (the caller logs it); every await here has a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass

import asyncpg

from pgguard.classify.catalog import DEFAULT_COMMENT_TAG, CatalogSnapshot, Volatility
from pgguard.classify.names import QualName, render
from pgguard.classify.rules import PiiRules

__all__ = ["CatalogChange", "diff_pii_columns", "load_catalog", "validate_rules"]

_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")

_RELATIONS = """
SELECT n.nspname, c.relname, c.relkind::text AS relkind,
       coalesce(array_agg(a.attname::text ORDER BY a.attnum)
                FILTER (WHERE a.attnum > 0 AND NOT a.attisdropped), '{}') AS columns,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END AS viewdef
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p')
  AND n.nspname <> ALL($1::text[]) AND n.nspname NOT LIKE 'pg\\_toast%'
GROUP BY n.nspname, c.relname, c.relkind, c.oid
"""

_FUNCTIONS = """
SELECT n.nspname, p.proname, p.provolatile::text AS provolatile, p.prokind::text AS prokind
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname <> ALL($1::text[])
"""

_COMMENTS = """
SELECT n.nspname, c.relname, a.attname::text, d.description
FROM pg_catalog.pg_description d
JOIN pg_catalog.pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_catalog.pg_class'::regclass
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid
WHERE d.objsubid > 0 AND NOT a.attisdropped AND n.nspname <> ALL($1::text[])
"""

_RANK = {Volatility.IMMUTABLE: 0, Volatility.STABLE: 1, Volatility.VOLATILE: 2}


async def load_catalog(dsn: str, comment_tag: str = DEFAULT_COMMENT_TAG, *,
                       deadline: float = 30.0) -> CatalogSnapshot:
    """Read a snapshot from `dsn` (a postgresql:// URL) within `deadline` seconds. Raises OSError, asyncpg errors or
    TimeoutError; the caller keeps its previous snapshot on failure."""
    async with asyncio.timeout(deadline):
        conn = await asyncpg.connect(dsn, timeout=deadline)
        try:
            # One snapshot of the catalog for all three queries.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                rel_rows = await conn.fetch(_RELATIONS, list(_SYSTEM_SCHEMAS))
                fn_rows = await conn.fetch(_FUNCTIONS, list(_SYSTEM_SCHEMAS))
                comment_rows = await conn.fetch(_COMMENTS, list(_SYSTEM_SCHEMAS))
        finally:
            await asyncio.shield(conn.close(timeout=5))
    relations: dict[QualName, tuple[str, ...]] = {}
    views: dict[QualName, str] = {}
    matviews: set[QualName] = set()
    for r in rel_rows:
        name = (r["nspname"], r["relname"])
        relations[name] = tuple(r["columns"])
        if r["viewdef"] is not None:
            views[name] = str(r["viewdef"])
            if r["relkind"] == "m":
                matviews.add(name)
    functions: dict[QualName, Volatility] = {}
    procedures: set[QualName] = set()
    for r in fn_rows:
        name = (r["nspname"], r["proname"])
        if r["prokind"] == "p":
            procedures.add(name)
            continue
        vol = Volatility.from_provolatile(r["provolatile"])
        prev = functions.get(name)
        if prev is None or _RANK[vol] > _RANK[prev]:
            functions[name] = vol  # overloads: the most volatile one counts
    comments = {((r["nspname"], r["relname"]), r["attname"]): str(r["description"])
                for r in comment_rows}
    digest = hashlib.sha256(json.dumps([
        sorted((render(k), v) for k, v in relations.items()),
        sorted((render(k), v) for k, v in views.items()),
        sorted(render(k) for k in matviews),
        sorted((render(k), v.value) for k, v in functions.items()),
        sorted(render(k) for k in procedures),
        sorted((render(k[0]), k[1], v) for k, v in comments.items()),
        comment_tag,
    ]).encode()).hexdigest()[:16]
    return CatalogSnapshot(relations=relations, views=views, materialized_views=frozenset(matviews),
                           functions=functions, procedures=frozenset(procedures),
                           column_comments=comments, comment_tag=comment_tag, version=digest)


@dataclass(frozen=True, slots=True)
class CatalogChange:
    """A PII column that was present and is gone (renamed or dropped): rules stop matching it."""

    column: str   # schema.table.column
    why: str

    def __str__(self) -> str:
        return f"{self.column}: {self.why}"


def validate_rules(rules: PiiRules, catalog: CatalogSnapshot) -> list[str]:
    """Rule relations and columns the catalog does not have (typos, renames, drops)."""
    problems = []
    for name, rule in sorted(rules.tables.items()):
        cols = catalog.relations.get(name)
        if cols is None:
            problems.append(f"pii.tables: {render(name)}: no such table or view")
            continue
        for col in sorted(rule.columns or ()):
            if col not in cols:
                problems.append(f"pii.tables: {render(name)}.{col}: no such column "
                                "(renamed or dropped?)")
    for fn in sorted(rules.functions):
        if fn not in catalog.functions:
            problems.append(f"pii.functions: {render(fn)}: no such function")
    return problems


def _pii_columns(rules: PiiRules,
                 catalog: CatalogSnapshot) -> dict[tuple[QualName, str], str]:
    out: dict[tuple[QualName, str], str] = {}
    for name, rule in rules.tables.items():
        for col in rule.columns or ():
            if col in catalog.relations.get(name, ()):
                out[(name, col)] = "rule"
    for name, cols in catalog.tagged_columns().items():
        for col in cols:
            out.setdefault((name, col), "comment")
    return out


def diff_pii_columns(rules: PiiRules, old: CatalogSnapshot,
                     new: CatalogSnapshot) -> list[CatalogChange]:
    """PII columns (by rule or by comment tag) present in `old` and missing from `new`."""
    before, after = _pii_columns(rules, old), _pii_columns(rules, new)
    changes = []
    for (rel, col), source in sorted(before.items()):
        if (rel, col) in after:
            continue
        cols = new.relations.get(rel)
        if cols is None:
            why = "table renamed or dropped"
        elif source == "comment" and col in cols:
            why = f"comment no longer carries {new.comment_tag!r}"
        else:
            why = "column renamed or dropped: the rule no longer matches anything"
        changes.append(CatalogChange(f"{render(rel)}.{col}", why))
    return changes
