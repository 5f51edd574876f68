"""PII resolution (CLASSIFICATION §6): which rule-marked data a statement touches.

`PiiModel` is the rule file joined with a catalog snapshot: every *PII relation* (rule tables,
tagged columns, views whose definition is PII, the built-in statistics catalogs) by qualified and
by bare name. `PiiResolver` walks one statement's tree with a chain of scope frames
`alias → Source`, and records `PiiMatch(column, rule)` for every touch:

- a table-level relation: any reference;
- a column rule: a column resolving to a PII column in any clause; a star covering the relation
  (`count(*)` is not a star); a whole-row reference (`row_to_json(u)`, `(u).email`, `email(u)`);
- DML: INSERT without column list or with a PII column, UPDATE/MERGE/ON CONFLICT setting one,
  any DELETE of a PII relation (rows destroyed).

Unqualified relation names match PII relations of *every* schema (fail closed: `"$user"`,
`pg_temp`, `SET SCHEMA`, set_config move resolution), unless a CTE of that name is in scope.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp

from pgguard.classify.catalog import CatalogSnapshot
from pgguard.classify.names import QualName, ident_name, render
from pgguard.classify.rules import PiiRules

# Built-in catalogs holding sample column values: table-level PII (schema absent or pg_catalog).
PII_CATALOGS: frozenset[str] = frozenset({
    "pg_stats", "pg_statistic", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic_ext_data",
    "pg_largeobject",
})


@dataclass(frozen=True, slots=True)
class PiiRelation:
    """A relation whose data is PII. `columns` None = table-level (any reference)."""

    name: QualName
    columns: frozenset[str] | None
    rule: str                      # what matched, for `explain` and the audit log
    via: tuple[str, ...] = ()      # for a PII view: the underlying PII columns


@dataclass(frozen=True, slots=True, order=True)
class PiiMatch:
    column: str   # `schema.table.column`, `schema.table.*` or `schema.function()`
    rule: str


@dataclass(frozen=True, slots=True)
class PiiModel:
    relations: Mapping[QualName, PiiRelation]
    by_name: Mapping[str, tuple[PiiRelation, ...]]
    schemas: frozenset[str]
    functions: frozenset[QualName]
    function_names: frozenset[str]
    # catalog columns of every relation (PII or not), qualified and by bare name
    columns: Mapping[QualName, frozenset[str]] = field(default_factory=dict)
    columns_by_name: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def lookup(self, schema: str | None, name: str) -> tuple[PiiRelation, ...]:
        if schema is None:
            return self.by_name.get(name, ())
        rel = self.relations.get((schema, name))
        return (rel,) if rel is not None else ()

    def known_columns(self, schema: str | None, name: str) -> frozenset[str] | None:
        if schema is None:
            return self.columns_by_name.get(name)
        return self.columns.get((schema, name))

    def pii_function(self, schema: str | None, name: str) -> QualName | None:
        if schema is None:
            if name in self.function_names:
                return next(f for f in sorted(self.functions) if f[1] == name)
            return None
        return (schema, name) if (schema, name) in self.functions else None

    @property
    def empty(self) -> bool:
        return not self.functions and all(r.name[0] == "pg_catalog"
                                          for r in self.relations.values())


def build_model(rules: PiiRules, catalog: CatalogSnapshot | None) -> PiiModel:
    """Join rules and catalog. Views are resolved to a fixed point (a view over a PII view is
    PII). Memoised on the rules object for the last catalog seen (building parses every view)."""
    memo = rules._memo
    key = "model"
    cached = memo.get(key)
    if cached is not None and cached[0] is catalog:
        model: PiiModel = cached[1]
        return model
    model = _build_model(rules, catalog)
    memo[key] = (catalog, model)
    return model


def _build_model(rules: PiiRules, catalog: CatalogSnapshot | None) -> PiiModel:
    rels: dict[QualName, PiiRelation] = {}
    for name, table_rule in rules.tables.items():
        rels[name] = PiiRelation(name, table_rule.columns, render(name))
    if catalog is not None:
        for name, cols in catalog.tagged_columns().items():
            prev = rels.get(name)
            if prev is not None and prev.columns is None:
                continue
            merged = (prev.columns if prev is not None and prev.columns is not None
                      else frozenset()) | cols
            rule = prev.rule if prev is not None else f"comment:{catalog.comment_tag}"
            rels[name] = PiiRelation(name, merged, rule)
    for cat in PII_CATALOGS:
        rels[("pg_catalog", cat)] = PiiRelation(("pg_catalog", cat), None, f"builtin:{cat}")
    columns: dict[QualName, frozenset[str]] = {}
    by_col_name: dict[str, set[str]] = {}
    if catalog is not None:
        for name, rel_cols in catalog.relations.items():
            columns[name] = frozenset(rel_cols)
            by_col_name.setdefault(name[1], set()).update(rel_cols)

    def make(rels: Mapping[QualName, PiiRelation]) -> PiiModel:
        by_name: dict[str, list[PiiRelation]] = {}
        for r in rels.values():
            by_name.setdefault(r.name[1], []).append(r)
        return PiiModel(
            relations=dict(rels),
            by_name={k: tuple(v) for k, v in by_name.items()},
            schemas=frozenset(r.name[0] for r in rels.values()),
            functions=rules.functions,
            function_names=frozenset(f[1] for f in rules.functions),
            columns=columns,
            columns_by_name={k: frozenset(v) for k, v in by_col_name.items()},
        )

    model = make(rels)
    if catalog is None or not catalog.views:
        return model
    # Fixed point: each round may reveal views over views.
    from pgguard.classify.parsing import parse_query  # (import cycle otherwise)

    pending = {v: sql for v, sql in catalog.views.items() if v not in rels}
    trees = {v: parse_query(sql) for v, sql in pending.items()}
    changed = True
    while changed and pending:
        changed = False
        for view in sorted(pending):
            tree = trees[view]
            if tree is None:
                # A definition we cannot parse is PII (fail closed).
                via: tuple[str, ...] = ("unparsed definition",)
            else:
                resolver = PiiResolver(model)
                resolver.visit_statement(tree)
                if not resolver.matches:
                    continue
                via = tuple(sorted({m.column for m in resolver.matches}))
            rels[view] = PiiRelation(view, None, f"view:{render(view)}", via)
            del pending[view]
            changed = True
        if changed:
            model = make(rels)
    return model


# -- the resolver ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Source:
    """One FROM item in a frame. `relations`: PII relations it may be (a bare name can match
    several schemas); `columns`: columns it is known to have (catalog or derived select list)."""

    relations: tuple[PiiRelation, ...] = ()
    columns: frozenset[str] | None = None
    renamed: bool = False  # alias column list: positional renaming, columns unknown


@dataclass(slots=True)
class _Frame:
    parent: _Frame | None
    sources: dict[str, _Source] = field(default_factory=dict)
    ctes: dict[str, frozenset[str] | None] = field(default_factory=dict)

    def chain(self) -> Iterator[_Frame]:
        f: _Frame | None = self
        while f is not None:
            yield f
            f = f.parent

    def find_source(self, alias: str) -> _Source | None:
        f: _Frame | None = self
        while f is not None:
            src = f.sources.get(alias)
            if src is not None:
                return src
            f = f.parent
        return None

    def is_cte(self, name: str) -> bool:
        f: _Frame | None = self
        while f is not None:
            if name in f.ctes:
                return True
            f = f.parent
        return False

    def cte_columns(self, name: str) -> frozenset[str] | None:
        f: _Frame | None = self
        while f is not None:
            if name in f.ctes:
                return f.ctes[name]
            f = f.parent
        return None


_QUERY_TYPES = (exp.Select, exp.SetOperation, exp.Values)
_DML_TYPES = (exp.Insert, exp.Update, exp.Delete, exp.Merge)


def _table_parts(table: exp.Table) -> tuple[str | None, str]:
    db = table.args.get("db")
    return (ident_name(db) if db is not None else None), ident_name(table.args.get("this"))


def output_columns(query: exp.Expression) -> frozenset[str] | None:
    """Output column names of a query, or None when a star makes them unknown."""
    while isinstance(query, exp.Subquery):
        query = query.this
    if isinstance(query, exp.SetOperation):
        query = query.this
        return output_columns(query)
    if not isinstance(query, exp.Select):
        return None
    names = set()
    for e in query.expressions:
        if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
            return None
        name = e.alias_or_name
        if not name:
            return None
        alias = e.args.get("alias")
        if isinstance(e, exp.Alias) and isinstance(alias, exp.Identifier):
            names.add(ident_name(alias))
        elif isinstance(e, exp.Column):
            names.add(ident_name(e.this))
        else:
            names.add(name.lower())
    return frozenset(names)


class PiiResolver:
    """Walk one statement tree and collect `matches`. Not thread-safe; one per statement."""

    __slots__ = ("matches", "model")

    def __init__(self, model: PiiModel) -> None:
        self.model = model
        self.matches: set[PiiMatch] = set()

    # -- recording ------------------------------------------------------------------------------

    def _touch(self, rel: PiiRelation, column: str) -> None:
        if rel.columns is None or column == "*":
            self.matches.add(PiiMatch(f"{render(rel.name)}.*", rel.rule))
            for v in rel.via:
                self.matches.add(PiiMatch(v, rel.rule))
        elif column in rel.columns:
            self.matches.add(PiiMatch(f"{render(rel.name)}.{column}", rel.rule))

    def _touch_all(self, rels: Iterable[PiiRelation]) -> None:
        for rel in rels:
            self._touch(rel, "*")

    # -- entry points ---------------------------------------------------------------------------

    def visit_statement(self, node: exp.Expression) -> None:
        self.visit(node, _Frame(None))

    def visit_object_tables(self, node: exp.Expression, skip: exp.Expression | None) -> None:
        """DDL: every relation named outside the embedded query is an *object* of the statement;
        an object that is a PII relation (any rule) is PII. Column qualifiers count too
        (`COMMENT ON COLUMN users.ssn`). `DROP SCHEMA s` of a schema holding PII is PII."""
        for sub in _walk_skipping(node, skip):
            if isinstance(sub, exp.Table):
                schema, name = _table_parts(sub)
                if not name and schema is not None:
                    self.touch_schema(schema)
                    continue
                self._touch_all(self.model.lookup(schema, name))
            elif isinstance(sub, exp.Column) and sub.args.get("table") is not None:
                db = sub.args.get("db")
                self._touch_all(self.model.lookup(ident_name(db) if db is not None else None,
                                                  ident_name(sub.args["table"])))

    def touch_schema(self, schema: str) -> None:
        for rel in self.model.relations.values():
            if rel.name[0] == schema and not rel.rule.startswith("builtin:"):
                self._touch(rel, "*")

    def touch_name(self, name: str) -> bool:
        rels = self.model.lookup(None, name)
        self._touch_all(rels)
        return bool(rels)

    # -- generic walk ---------------------------------------------------------------------------

    def visit(self, node: exp.Expression, frame: _Frame) -> None:
        # Dispatch on the exact node type; `_handler_for` picks the handler once per class.
        handler = _HANDLERS.get(type(node))
        if handler is None:
            handler = _handler_for(type(node))
        handler(self, node, frame)

    def _set_operation(self, node: exp.SetOperation, frame: _Frame) -> None:
        frame = self._with(node, frame)
        self._children(node, frame, skip=("with_",))

    def _table_reference(self, node: exp.Table, frame: _Frame) -> None:
        # A relation outside FROM (e.g. TABLE in an odd position): fail closed by name.
        self._register_table(node, frame)

    def _plain_anonymous(self, node: exp.Anonymous, frame: _Frame) -> None:
        self._anonymous(node, frame, None)

    def _all_children(self, node: exp.Expression, frame: _Frame) -> None:
        self._children(node, frame, ())

    def _children(self, node: exp.Expression, frame: _Frame, skip: tuple[str, ...]) -> None:
        visit = self.visit
        for key, value in node.args.items():
            if isinstance(value, exp.Expression):
                if not skip or key not in skip:
                    visit(value, frame)
            elif isinstance(value, list) and (not skip or key not in skip):
                for v in value:
                    if isinstance(v, exp.Expression):
                        visit(v, frame)

    def _with(self, node: exp.Expression, frame: _Frame) -> _Frame:
        w = node.args.get("with_")
        if not isinstance(w, exp.With):
            return frame
        frame = _Frame(frame)
        recursive = bool(w.args.get("recursive"))
        for cte in w.expressions:
            name = ident_name(cte.args["alias"].this) if cte.args.get("alias") else ""
            body = cte.this
            cols = output_columns(body) if isinstance(body, _QUERY_TYPES) else None
            alias_cols = cte.args["alias"].columns if cte.args.get("alias") else []
            if alias_cols:
                cols = frozenset(ident_name(c) for c in alias_cols)
            if recursive:
                frame.ctes[name] = cols
            # Non-recursive: the body sees the outer relation of the same name, not the CTE.
            self.visit(body, frame)
            frame.ctes[name] = cols
        return frame

    # -- SELECT ---------------------------------------------------------------------------------

    def _select(self, node: exp.Select, outer: _Frame) -> None:
        frame = _Frame(self._with(node, outer))
        from_ = node.args.get("from_")
        if from_ is not None:
            self._register_from_item(from_.this, frame)
        for join in node.args.get("joins") or []:
            self._register_from_item(join.this, frame)
        for lat in node.args.get("laterals") or []:
            self._register_from_item(lat, frame)
        for join in node.args.get("joins") or []:
            for key in ("on", "using", "match_condition"):
                cond = join.args.get(key)
                if isinstance(cond, exp.Expression):
                    self.visit(cond, frame)
                elif isinstance(cond, list):
                    for c in cond:
                        if isinstance(c, exp.Expression):
                            self.visit(c, frame)
        for e in node.expressions:
            if isinstance(e, exp.Star):
                self._star(frame)
            else:
                self.visit(e, frame)
        self._children(node, frame, skip=("with_", "from_", "joins", "laterals", "expressions",
                                          "into", "locks"))

    def _star(self, frame: _Frame) -> None:
        for src in frame.sources.values():
            self._touch_all(src.relations)

    def _register_from_item(self, item: exp.Expression, frame: _Frame) -> None:
        alias_node = item.args.get("alias")
        alias = ident_name(alias_node.this) if isinstance(alias_node, exp.TableAlias) and \
            alias_node.this is not None else None
        if isinstance(item, exp.Table):
            self._register_table(item, frame)
            for join in item.args.get("joins") or []:
                self._register_from_item(join.this, frame)
                if join.args.get("on") is not None:
                    self.visit(join.args["on"], frame)
            return
        if isinstance(item, exp.Subquery):
            inner = item.this
            if isinstance(inner, exp.Table) and inner.args.get("joins"):
                # `(t1 JOIN t2) j`: a parenthesised join registers its members.
                self._register_from_item(inner, frame)
                return
            self.visit(inner, frame)
            cols = output_columns(inner) if isinstance(inner, _QUERY_TYPES) else None
            if isinstance(alias_node, exp.TableAlias) and alias_node.columns:
                cols = frozenset(ident_name(c) for c in alias_node.columns)
            if alias:
                frame.sources[alias] = _Source((), cols)
            return
        if isinstance(item, exp.Lateral):
            self._register_from_item(item.this, frame) if not isinstance(
                item.this, exp.Expression) or isinstance(item.this, exp.Subquery | exp.Table) \
                else self.visit(item.this, frame)
            if alias and isinstance(item.this, exp.Subquery):
                src = frame.sources.pop(ident_name(item.this.alias) if item.this.alias else "",
                                        None)
                frame.sources[alias] = src or _Source()
            return
        # Values, Unnest, table functions, anything else: visit, register the alias.
        self.visit(item, frame)
        if alias:
            cols = None
            if isinstance(alias_node, exp.TableAlias) and alias_node.columns:
                cols = frozenset(ident_name(c) for c in alias_node.columns)
            frame.sources[alias] = _Source((), cols)

    def _register_table(self, table: exp.Table, frame: _Frame) -> _Source:
        this = table.args.get("this")
        alias_node = table.args.get("alias")
        alias = ident_name(alias_node.this) if isinstance(alias_node, exp.TableAlias) and \
            alias_node.this is not None else None
        if not isinstance(this, exp.Identifier):
            # A table function `f(x) AS a`, or `schema.f(x)` (Dot): visit the call.
            if isinstance(this, exp.Expression):
                self.visit(this, frame)
            src = _Source()
            if alias_node is not None and isinstance(alias_node, exp.TableAlias) and \
                    alias_node.columns:
                src.columns = frozenset(ident_name(c) for c in alias_node.columns)
            frame.sources[alias or (this.name.lower() if isinstance(this, exp.Expression)
                                    else "")] = src
            return src
        schema, name = _table_parts(table)
        if schema is None and frame.is_cte(name):
            src = _Source((), frame.cte_columns(name))
        else:
            rels = self.model.lookup(schema, name)
            for rel in rels:
                if rel.columns is None:
                    self._touch(rel, "*")
            src = _Source(rels, self.model.known_columns(schema, name))
            if rels and isinstance(alias_node, exp.TableAlias) and alias_node.columns:
                # `users AS u(a, b, c)` renames columns by position: treat as whole-row.
                self._touch_all(rels)
                src.renamed = True
                src.columns = frozenset(ident_name(c) for c in alias_node.columns)
        frame.sources[alias or name] = src
        return src

    # -- columns, whole rows, functions ---------------------------------------------------------

    def _column(self, col: exp.Column, frame: _Frame) -> None:
        this = col.this
        qual_node = col.args.get("table")
        if isinstance(this, exp.Star):
            if qual_node is None:
                self._star(frame)
                return
            self._qualified(col, "*", frame)
            return
        name = ident_name(this)
        if qual_node is not None:
            self._qualified(col, name, frame)
            return
        self._unqualified(name, frame)

    def _qualified(self, col: exp.Column, name: str, frame: _Frame) -> None:
        qual = ident_name(col.args["table"])
        db_node = col.args.get("db")
        schema = ident_name(db_node) if db_node is not None else None
        src = frame.find_source(qual) if schema is None else None
        if src is None and schema is not None:
            # `public.users.email`: match a source registered from that exact relation.
            for f in frame.chain():
                s = f.sources.get(qual)
                if s is not None:
                    src = s
                    break
        if src is not None:
            for rel in src.relations:
                self._touch(rel, "*" if src.renamed else name)
            return
        # Unknown qualifier: bare-name rule match (fail closed).
        for rel in self.model.lookup(schema, qual):
            self._touch(rel, name)

    def _unqualified(self, name: str, frame: _Frame) -> None:
        f: _Frame | None = frame
        while f is not None:
            known_here = False
            for alias, src in f.sources.items():
                for rel in src.relations:
                    if alias == name:
                        self._touch(rel, "*")  # whole-row reference
                    elif src.renamed:
                        if src.columns is None or name in src.columns:
                            self._touch(rel, "*")
                    else:
                        self._touch(rel, name)
                if src.columns is not None and name in src.columns:
                    known_here = True
            if known_here:
                return
            f = f.parent

    def _dot(self, node: exp.Dot, frame: _Frame) -> None:
        left, right = node.this, node.expression
        if isinstance(left, exp.Paren) and isinstance(left.this, exp.Column) and \
                isinstance(right, exp.Identifier):
            inner = left.this
            # `(u).email` / `(u.*).email` → u.email
            qual = None
            if isinstance(inner.this, exp.Star) and inner.args.get("table") is not None:
                qual = ident_name(inner.args["table"])
            elif inner.args.get("table") is None and isinstance(inner.this, exp.Identifier):
                qual = ident_name(inner.this)
            if qual is not None and frame.find_source(qual) is not None:
                self._qualified(exp.Column(this=right, table=exp.to_identifier(qual)),
                                ident_name(right), frame)
                return
        if isinstance(left, exp.Identifier) and isinstance(right, exp.Anonymous):
            self._anonymous(right, frame, ident_name(left))
            return
        self._children(node, frame, skip=())

    def _anonymous(self, node: exp.Anonymous, frame: _Frame, schema: str | None) -> None:
        name = ident_name(node.this) if isinstance(node.this, exp.Identifier) else \
            ident_name(str(node.this))
        fn = self.model.pii_function(schema, name)
        if fn is not None:
            self.matches.add(PiiMatch(f"{render(fn)}()", f"functions:{render(fn)}"))
        args = node.expressions
        if schema is None and len(args) == 1 and isinstance(args[0], exp.Column) and \
                args[0].args.get("table") is None and isinstance(args[0].this, exp.Identifier):
            qual = ident_name(args[0].this)
            if frame.find_source(qual) is not None:
                # Functional notation `email(u)` = `u.email`.
                self._qualified(exp.Column(this=exp.to_identifier(name, quoted=True),
                                           table=exp.to_identifier(qual)), name, frame)
                src = frame.find_source(qual) or _Source()
                if (src.columns is not None and name in src.columns) or any(
                        r.columns and name in r.columns for r in src.relations):
                    return  # a known column: not a whole-row argument
        self._children(node, frame, skip=("this",))

    # -- DML ------------------------------------------------------------------------------------

    def _target(self, node: exp.Expression, frame: _Frame) -> tuple[_Source, list[str] | None]:
        """Register a DML target (`Table` or `Schema(Table, cols)`); return it and its column
        list (None when absent)."""
        target = node.args.get("this")
        cols: list[str] | None = None
        if isinstance(target, exp.Schema):
            cols = [ident_name(c) for c in target.expressions]
            target = target.this
        if not isinstance(target, exp.Table):
            return _Source(), cols
        return self._register_table(target, frame), cols

    def _insert(self, node: exp.Insert, outer: _Frame) -> None:
        outer = self._with(node, outer)
        frame = _Frame(outer)
        src, cols = self._target(node, frame)
        if cols is None:
            self._touch_all(src.relations)
        else:
            for rel in src.relations:
                for c in cols:
                    self._touch(rel, c)
        frame.sources["excluded"] = src
        source = node.args.get("expression")
        if isinstance(source, exp.Expression):
            self.visit(source, outer)
        for key in ("conflict", "returning", "where"):
            value = node.args.get(key)
            if isinstance(value, exp.Returning):
                self._returning(value, frame)
            elif isinstance(value, exp.OnConflict):
                self._set_items(value.expressions, src, frame)
                for k, v in value.args.items():
                    if k != "expressions" and isinstance(v, exp.Expression):
                        self.visit(v, frame)
            elif isinstance(value, exp.Expression):
                self.visit(value, frame)

    def _set_items(self, items: Iterable[exp.Expression], target: _Source, frame: _Frame) -> None:
        """`SET col = expr` items: the left side names target columns, the right is an
        expression in the statement's scope."""
        for item in items:
            if isinstance(item, exp.EQ):
                left = item.this
                lefts = left.expressions if isinstance(left, exp.Tuple) else [left]
                for c in lefts:
                    if isinstance(c, exp.Column):
                        for rel in target.relations:
                            self._touch(rel, "*" if target.renamed else ident_name(c.this))
                    elif isinstance(c, exp.Expression):
                        self.visit(c, frame)
                if isinstance(item.expression, exp.Expression):
                    self.visit(item.expression, frame)
            elif isinstance(item, exp.Expression):
                self.visit(item, frame)

    def _returning(self, node: exp.Returning, frame: _Frame) -> None:
        for e in node.expressions:
            if isinstance(e, exp.Star):
                self._star(frame)
            else:
                self.visit(e, frame)

    def _update(self, node: exp.Update, outer: _Frame) -> None:
        frame = _Frame(self._with(node, outer))
        src, _ = self._target(node, frame)
        from_ = node.args.get("from_")
        if from_ is not None:
            self._register_from_item(from_.this, frame)
        for join in node.args.get("joins") or []:
            self._register_from_item(join.this, frame)
            if join.args.get("on") is not None:
                self.visit(join.args["on"], frame)
        self._set_items(node.expressions, src, frame)
        self._dml_tail(node, frame)

    def _dml_tail(self, node: exp.Expression, frame: _Frame) -> None:
        """WHERE, RETURNING, ORDER BY and LIMIT of an UPDATE or DELETE."""
        for key in ("where", "returning", "order", "limit"):
            value = node.args.get(key)
            if isinstance(value, exp.Returning):
                self._returning(value, frame)
            elif isinstance(value, exp.Expression):
                self.visit(value, frame)

    def _delete(self, node: exp.Delete, outer: _Frame) -> None:
        frame = _Frame(self._with(node, outer))
        src, _ = self._target(node, frame)
        self._touch_all(src.relations)  # rows destroyed
        for item in node.args.get("using") or []:
            self._register_from_item(item, frame)
        self._dml_tail(node, frame)

    def _merge(self, node: exp.Merge, outer: _Frame) -> None:
        frame = _Frame(self._with(node, outer))
        src, _ = self._target(node, frame)
        using = node.args.get("using")
        if isinstance(using, exp.Expression):
            self._register_from_item(using, frame)
        if isinstance(node.args.get("on"), exp.Expression):
            self.visit(node.args["on"], frame)
        whens = node.args.get("whens")
        for when in (whens.expressions if isinstance(whens, exp.Whens) else []):
            for key, value in when.args.items():
                if key != "then" and isinstance(value, exp.Expression):
                    self.visit(value, frame)
            then = when.args.get("then")
            if isinstance(then, exp.Update):
                self._set_items(then.expressions, src, frame)
            elif isinstance(then, exp.Insert):
                cols = then.args.get("this")
                if isinstance(cols, exp.Tuple | exp.Schema):
                    for c in cols.expressions:
                        for rel in src.relations:
                            self._touch(rel, "*" if src.renamed else ident_name(
                                c.this if isinstance(c, exp.Column) else c))
                else:
                    self._touch_all(src.relations)
                if isinstance(then.args.get("expression"), exp.Expression):
                    self.visit(then.args["expression"], frame)
            elif then is not None:
                # DELETE (a Var), DO NOTHING: a DELETE destroys rows.
                if "DELETE" in then.sql().upper():
                    self._touch_all(src.relations)
        if isinstance(node.args.get("returning"), exp.Returning):
            self._returning(node.args["returning"], frame)


_Handler = Callable[[PiiResolver, Any, _Frame], None]
# `PiiResolver.visit` handlers by exact node type, in the isinstance order below.
_HANDLERS: dict[type, _Handler] = {}
_HANDLER_ORDER: tuple[tuple[type, _Handler], ...] = (
    (exp.Select, PiiResolver._select),
    (exp.SetOperation, PiiResolver._set_operation),
    (exp.Column, PiiResolver._column),
    (exp.Insert, PiiResolver._insert),
    (exp.Update, PiiResolver._update),
    (exp.Delete, PiiResolver._delete),
    (exp.Merge, PiiResolver._merge),
    (exp.Dot, PiiResolver._dot),
    (exp.Anonymous, PiiResolver._plain_anonymous),
    (exp.Table, PiiResolver._table_reference),
)


def _handler_for(cls: type) -> _Handler:
    handler: _Handler = PiiResolver._all_children
    for base, fn in _HANDLER_ORDER:
        if issubclass(cls, base):
            handler = fn
            break
    _HANDLERS[cls] = handler
    return handler


def _walk_skipping(node: exp.Expression, skip: exp.Expression | None) -> Iterator[exp.Expression]:
    stack = [node]
    while stack:
        n = stack.pop()
        if n is skip:
            continue
        yield n
        for value in n.args.values():
            if isinstance(value, exp.Expression):
                stack.append(value)
            elif isinstance(value, list):
                stack.extend(v for v in value if isinstance(v, exp.Expression))
