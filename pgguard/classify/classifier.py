"""`classify()`: SQL text (+ rules, catalog snapshot, session facts) → `Classification`.

The pipeline of CLASSIFICATION §2: tokenize the whole message once, split on semicolon tokens,
dispatch every statement on its leading keyword (authoritative; sqlglot's tree must agree),
walk the whole tree for effects, resolve PII, and fail closed (UNKNOWN with a reason) on anything
that cannot be classified with certainty.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp
from sqlglot.tokenizer_core import TokenType

from pgguard.classify.catalog import CatalogSnapshot, Volatility
from pgguard.classify.classes import EFFECT_CLASSES, StatementClass, class_names
from pgguard.classify.functions import builtin_functions, side_effect_of
from pgguard.classify.gucs import classify_set
from pgguard.classify.names import fold, ident_name, render
from pgguard.classify.parsing import (
    LITERAL_TOKENS,
    Chunk,
    FlatToken,
    ParseError,
    Segment,
    TokenError,
    flat_tokens,
    lumped_tail,
    parse_chunk,
    segments,
    split,
    tokenize,
)
from pgguard.classify.pii import PiiMatch, PiiModel, PiiResolver, build_model
from pgguard.classify.rules import PiiRules
from pgguard.classify.session import ChangeKind, SessionChange, SessionFacts

C = StatementClass
REDACTED = "<redacted>"

# Catalogs whose reading is ADMIN (credentials, server configuration).
ADMIN_CATALOGS: frozenset[str] = frozenset({
    "pg_authid", "pg_shadow", "pg_user_mapping", "pg_user_mappings", "pg_hba_file_rules",
    "pg_ident_file_mappings", "pg_file_settings",
})

_QUERY_ROOTS = (exp.Select, exp.SetOperation, exp.Values, exp.Subquery)
_DML_ROOTS = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
_DML_LEADS: dict[str, type[exp.Expression]] = {
    "INSERT": exp.Insert, "UPDATE": exp.Update, "DELETE": exp.Delete, "MERGE": exp.Merge}
_DDL_LEADS = frozenset({"CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE", "SECURITY",
                        "IMPORT", "REASSIGN"})
_TC_LEADS = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT",
                       "RELEASE"})
_ADMIN_LEADS = frozenset({"DO", "CALL", "LISTEN", "NOTIFY", "UNLISTEN", "VACUUM", "ANALYZE",
                          "ANALYSE", "CLUSTER", "REINDEX", "CHECKPOINT", "LOCK", "LOAD",
                          "REFRESH"})
# DDL on these objects is also ADMIN (CLASSIFICATION §1).
_ADMIN_OBJECTS = frozenset({"ROLE", "USER", "GROUP", "EXTENSION", "LANGUAGE", "SERVER",
                            "DATABASE", "TABLESPACE", "SUBSCRIPTION", "PUBLICATION"})
_ADMIN_OBJECT_PAIRS = frozenset({("FOREIGN", "DATA"), ("EVENT", "TRIGGER")})
_QUOTED = frozenset({TokenType.IDENTIFIER}) | LITERAL_TOKENS

# What the effect walk does with a node, by its exact type (the isinstance order of
# CLASSIFICATION §2 step 6, computed once per node class).
_K_OTHER, _K_TABLE, _K_CTE, _K_DML, _K_SELECT, _K_LOCK, _K_COMMAND, _K_ANON, _K_FUNC = range(9)
_NODE_KINDS: dict[type, int] = {}
# Effect classes of a typed (non-Anonymous) function class, from its `sql_names()` (§5).
_FUNC_EFFECTS: dict[type, frozenset[StatementClass]] = {}


def _node_kind(cls: type) -> int:
    if issubclass(cls, exp.Table):
        kind = _K_TABLE
    elif issubclass(cls, exp.Anonymous):
        kind = _K_ANON
    elif issubclass(cls, _DML_ROOTS):
        kind = _K_DML
    elif issubclass(cls, exp.Select):
        kind = _K_SELECT
    elif issubclass(cls, exp.Lock):
        kind = _K_LOCK
    elif issubclass(cls, exp.Command):
        kind = _K_COMMAND
    elif issubclass(cls, exp.Func):
        kind = _K_FUNC
    elif issubclass(cls, exp.CTE):
        kind = _K_CTE
    else:
        kind = _K_OTHER
    _NODE_KINDS[cls] = kind
    return kind


def _func_effect(cls: type) -> frozenset[StatementClass]:
    effects: set[StatementClass] = set()
    for n in cls.sql_names():  # type: ignore[attr-defined]
        effect = side_effect_of(n.lower())
        if effect == "write":
            effects.add(C.WRITE)
        elif effect == "admin":
            effects.add(C.ADMIN)
    frozen = frozenset(effects)
    _FUNC_EFFECTS[cls] = frozen
    return frozen


@dataclass(frozen=True, slots=True)
class StatementResult:
    """One statement of the message: its original text, classes, and the reason if UNKNOWN."""

    sql: str
    classes: frozenset[StatementClass]
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one message (a simple Query string or one Parse).

    `classes` is the union over `statements` (empty: nothing to run). `pii_columns` are
    `schema.table.column`, `schema.table.*` or `schema.function()`; `pii_matches` pairs each with
    the rule that matched. `session_dependent` results (EXECUTE, FETCH, MOVE) must not be cached
    across sessions; `session_changes` are for `SessionFacts.apply()`.
    """

    classes: frozenset[StatementClass]
    statements: tuple[StatementResult, ...]
    tables: tuple[str, ...] = ()
    pii_columns: tuple[str, ...] = ()
    pii_matches: tuple[PiiMatch, ...] = ()
    functions: tuple[str, ...] = ()
    fingerprint: str = ""
    redacted_sql: str = ""
    reason: str | None = None
    session_dependent: bool = False
    session_changes: tuple[SessionChange, ...] = ()

    @property
    def unknown(self) -> bool:
        return C.UNKNOWN in self.classes

    def to_json(self) -> dict[str, Any]:
        """The object `pgguard explain --json` prints (DESIGN §8)."""
        return {
            "classes": class_names(self.classes),
            "statements": [{"sql": s.sql, "classes": class_names(s.classes), "reason": s.reason}
                           for s in self.statements],
            "tables": list(self.tables),
            "pii_columns": list(self.pii_columns),
            "pii_rules": [{"column": m.column, "rule": m.rule} for m in self.pii_matches],
            "functions": list(self.functions),
            "fingerprint": self.fingerprint,
            "redacted_sql": self.redacted_sql,
            "reason": self.reason,
        }


class _Unknown(Exception):
    """Fail closed: the statement is UNKNOWN for this reason."""


@dataclass(slots=True)
class _Acc:
    """What one message's analysis collects beside classes."""

    tables: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    pii: set[PiiMatch] = field(default_factory=set)


def classify(sql: str, rules: PiiRules, catalog: CatalogSnapshot | None = None,
             session: SessionFacts | None = None, *, max_sql_bytes: int | None = None,
             single_statement: bool = False) -> Classification:
    """Classify one message. Pure: reads `session`, never writes it.

    `single_statement` is for the extended protocol's Parse, which allows one statement:
    more is UNKNOWN. `max_sql_bytes` (limits.max_sql_bytes) caps the UTF-8 size: above it the
    message is UNKNOWN without being parsed.
    """
    if max_sql_bytes is not None and len(sql) > max_sql_bytes // 4 and \
            len(sql.encode("utf-8", "surrogatepass")) > max_sql_bytes:
        reason = f"statement larger than limits.max_sql_bytes ({max_sql_bytes} bytes)"
        return _whole_unknown(sql, reason, f"<statement of {len(sql)} characters not parsed>")
    facts = session or SessionFacts()
    if not facts.standard_conforming_strings and "\\" in sql:
        return _whole_unknown(sql, "backslash while standard_conforming_strings is off",
                              None)
    try:
        chunks = split(sql, tokenize(sql))
        segs = [segments(c) for c in chunks]
    except (TokenError, RecursionError) as exc:
        return _whole_unknown(sql, f"tokenizer error: {_short(exc)}",
                              "<statement that could not be tokenized>")
    fingerprint, redacted = _fingerprint_and_redact(sql, segs)
    if not chunks:
        return Classification(frozenset(), (), fingerprint=fingerprint, redacted_sql=redacted)
    run = _Run(rules, catalog, facts)
    results: list[StatementResult] = []
    for chunk, seg in zip(chunks, segs, strict=True):
        results.append(run.statement(chunk, seg))
    if single_statement and len(results) > 1:
        results = [StatementResult(r.sql, frozenset({C.UNKNOWN}),
                                   "more than one statement in a Parse message")
                   for r in results]
    classes: frozenset[StatementClass] = frozenset().union(*(r.classes for r in results))
    reasons = [r.reason for r in results if r.reason]
    acc = run.acc
    return Classification(
        classes=classes,
        statements=tuple(results),
        tables=tuple(sorted(acc.tables)),
        pii_columns=tuple(sorted({m.column for m in acc.pii})),
        pii_matches=tuple(sorted(acc.pii)),
        functions=tuple(sorted(acc.functions)),
        fingerprint=fingerprint,
        redacted_sql=redacted,
        reason="; ".join(reasons) if C.UNKNOWN in classes else None,
        session_dependent=run.session_dependent,
        session_changes=tuple(run.changes),
    )


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _whole_unknown(sql: str, reason: str, redacted: str | None) -> Classification:
    digest = hashlib.blake2b(sql.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    shown = redacted if redacted is not None else "<statement not shown>"
    return Classification(frozenset({C.UNKNOWN}), (StatementResult(shown, frozenset({C.UNKNOWN}),
                                                                    reason),),
                          fingerprint=f"raw:{digest}", redacted_sql=shown, reason=reason)


def _fingerprint_and_redact(sql: str, segs: list[list[Segment]]) -> tuple[str, str]:
    """One pass over the un-lumped tokens.

    Fingerprint: stable across literal values, whitespace, comments and keyword case.
    Redacted SQL: the message with every literal (strings of any quoting, numbers, dollar-quoted
    bodies) replaced by `<redacted>`: unambiguous next to jsonb's `?`, `?|`, `?&` operators and
    `$n` parameters (kept), and never valid SQL, so a redacted text is not mistaken for a real
    one. Comments are kept.
    """
    parts: list[str] = []
    add = parts.append
    out: list[str] = []
    pos = 0
    literal, ident, var, param, number = (LITERAL_TOKENS, TokenType.IDENTIFIER, TokenType.VAR,
                                          TokenType.PARAMETER, TokenType.NUMBER)
    for statement in segs:
        prev: Any = None  # the previous token and its segment's base
        prev_base = 0
        for base, toks in statement:
            for tok in toks:
                ttype = tok.token_type
                if ttype in literal:
                    start = base + tok.start
                    # `$1`: a PARAMETER token directly followed by its NUMBER, kept.
                    if not (ttype is number and prev is not None and
                            prev.token_type is param and prev_base + prev.end + 1 == start):
                        add("?")
                        out.append(sql[pos:start])
                        out.append(REDACTED)
                        pos = base + tok.end + 1
                    else:
                        add(tok.text.upper())
                elif ttype is ident:
                    add('"' + tok.text + '"')
                elif ttype is var:
                    add(fold(tok.text))
                else:
                    add(tok.text.upper())
                prev, prev_base = tok, base
        add(";")
    out.append(sql[pos:])
    digest = hashlib.blake2b(" ".join(parts).encode("utf-8", "surrogatepass"),
                             digest_size=8).hexdigest()
    return digest, "".join(out)


def _word(tok: Any) -> str:
    """Upper-case keyword text of an unquoted token; "" for quoted identifiers and literals."""
    tt = tok.token_type if hasattr(tok, "token_type") else tok.type
    if tt in _QUOTED:
        return ""
    return str(tok.text).upper()


def _name(tok: Any) -> str:
    """A token as an identifier: quoted exact, else folded."""
    tt = tok.token_type if hasattr(tok, "token_type") else tok.type
    if tt is TokenType.IDENTIFIER:
        return str(tok.text)
    return fold(str(tok.text))


class _Run:
    """One message's classification state (local PREPARE/DECLARE overlay, collected facts)."""

    def __init__(self, rules: PiiRules, catalog: CatalogSnapshot | None,
                 facts: SessionFacts) -> None:
        self.rules = rules
        self.catalog = catalog
        self.model: PiiModel = build_model(rules, catalog)
        self.builtins = builtin_functions()
        self.facts = facts
        self.prepared: dict[str, frozenset[StatementClass]] = {}
        self.cursors: dict[str, frozenset[StatementClass]] = {}
        self.changes: list[SessionChange] = []
        self.session_dependent = False
        self.acc = _Acc()

    # -- statements -----------------------------------------------------------------------------

    def statement(self, chunk: Chunk, segs: list[Segment]) -> StatementResult:
        text = chunk.text[chunk.tokens[0].start:chunk.tokens[-1].end + 1]
        try:
            if "&" in chunk.text:  # the message (or the tail it was re-tokenized from)
                _check_unicode_identifiers(flat_tokens(segs))
            classes = self.dispatch(chunk)
        except _Unknown as exc:
            return StatementResult(text, frozenset({C.UNKNOWN}), str(exc))
        except RecursionError:
            return StatementResult(text, frozenset({C.UNKNOWN}), "statement nested too deeply")
        except (ParseError, TokenError) as exc:
            return StatementResult(text, frozenset({C.UNKNOWN}), f"parse error: {_short(exc)}")
        return StatementResult(text, frozenset(classes))

    def dispatch(self, chunk: Chunk) -> set[StatementClass]:
        if not chunk.tokens:
            raise _Unknown("empty statement body")
        lead_tok = chunk.tokens[0]
        lead = "(" if lead_tok.token_type is TokenType.L_PAREN else _word(lead_tok)
        if lead in ("SELECT", "VALUES", "TABLE", "(", "WITH"):
            return self.query_statement(chunk, lead)
        if lead in _DML_LEADS:
            tree = self.parse(chunk)
            if not isinstance(tree, _DML_LEADS[lead]):
                raise _Unknown(f"{lead} statement parsed as {type(tree).__name__}")
            return self.analyse(tree, query=False)
        if lead == "TRUNCATE":
            tree = self.parse(chunk)
            if not isinstance(tree, exp.TruncateTable):
                raise _Unknown(f"TRUNCATE parsed as {type(tree).__name__}")
            resolver = PiiResolver(self.model)
            resolver.visit_object_tables(tree, None)
            self.collect_tables(tree)
            self.acc.pii |= resolver.matches
            return {C.WRITE} | ({C.PII} if resolver.matches else set())
        if lead == "COPY":
            return self.copy(chunk)
        if lead in _DDL_LEADS:
            return self.ddl(chunk, lead)
        if lead in ("SET", "RESET"):
            return {classify_set(self.words_after_lead(chunk))}
        if lead == "SHOW":
            return {C.READ}
        if lead == "DISCARD":
            rest = self.rest(chunk)
            if rest and _word(rest[0]) == "ALL":
                self.changes.append(SessionChange(ChangeKind.DISCARD_ALL))
                self.prepared.clear()
                self.cursors.clear()
                return {C.ADMIN}
            return {C.TX}
        if lead == "DEALLOCATE":
            rest = [t for t in self.rest(chunk) if _word(t) != "PREPARE"]
            name = None if not rest or _word(rest[0]) == "ALL" else _name(rest[0])
            self.changes.append(SessionChange(ChangeKind.DEALLOCATE, name))
            return {C.TX}
        if lead == "CLOSE":
            rest = self.rest(chunk)
            name = None if not rest or _word(rest[0]) == "ALL" else _name(rest[0])
            self.changes.append(SessionChange(ChangeKind.CLOSE, name))
            return {C.TX}
        if lead in _TC_LEADS:
            rest = self.rest(chunk)
            if lead in ("COMMIT", "ROLLBACK") and rest and _word(rest[0]) == "PREPARED":
                return {C.ADMIN}
            return {C.TX}
        if lead in _ADMIN_LEADS:
            return {C.ADMIN}
        if lead == "EXPLAIN":
            return self.explain(chunk)
        if lead == "PREPARE":
            return self.prepare(chunk)
        if lead == "EXECUTE":
            return self.execute(chunk)
        if lead == "DECLARE":
            return self.declare(chunk)
        if lead in ("FETCH", "MOVE"):
            return self.fetch(chunk)
        raise _Unknown(f"unrecognised leading keyword {lead_tok.text[:40]!r}")

    # -- helpers --------------------------------------------------------------------------------

    def parse(self, chunk: Chunk) -> exp.Expression:
        try:
            tree = parse_chunk(chunk)
        except ParseError as exc:
            raise _Unknown(f"parse error: {_short(exc)}") from None
        if isinstance(tree, exp.Command):
            raise _Unknown("sqlglot could not parse the statement (Command fallback)")
        return tree

    def rest(self, chunk: Chunk) -> list[Any]:
        """Tokens after the leading keyword, un-lumped."""
        tail = lumped_tail(chunk)
        if tail is not None:
            return list(tail.tokens)
        return list(chunk.tokens[1:])

    def words_after_lead(self, chunk: Chunk) -> list[tuple[str, str, bool]]:
        """(keyword text upper or "", identifier name, quoted) for SET/RESET parsing."""
        out = []
        for t in self.rest(chunk):
            out.append((_word(t), _name(t) if t.token_type not in LITERAL_TOKENS else "",
                        t.token_type is TokenType.IDENTIFIER or t.token_type in LITERAL_TOKENS))
        return out

    def inner_chunk(self, chunk: Chunk) -> Chunk:
        """The chunk after the leading keyword as its own statement chunk (un-lumped)."""
        tail = lumped_tail(chunk)
        if tail is not None:
            return tail
        return chunk.sub(1)

    # -- queries and effects --------------------------------------------------------------------

    def query_statement(self, chunk: Chunk, lead: str) -> set[StatementClass]:
        tree = self.parse(chunk)
        ok = isinstance(tree, _QUERY_ROOTS) or (lead == "WITH" and isinstance(tree, _DML_ROOTS))
        if not ok:
            raise _Unknown(f"{lead} statement parsed as {type(tree).__name__}")
        return self.analyse(tree, query=isinstance(tree, _QUERY_ROOTS))

    def analyse(self, tree: exp.Expression, query: bool, pii: bool = True,
                effects: bool = True) -> set[StatementClass]:
        """Effect walk over every node, then PII resolution; READ for a query without effects."""
        classes: set[StatementClass] = set()
        pii_candidate = self.effect_walk(tree, classes, effects)
        if pii and pii_candidate:
            resolver = PiiResolver(self.model)
            resolver.visit_statement(tree)
            if resolver.matches:
                classes.add(C.PII)
                self.acc.pii |= resolver.matches
        if query and not classes & EFFECT_CLASSES:
            classes.add(C.READ)
        return classes

    def effect_walk(self, tree: exp.Expression, classes: set[StatementClass],
                    effects: bool = True) -> bool:
        """Add effect classes; collect tables and functions. Returns whether PII resolution is
        needed (a relation or function the rules may cover is referenced).

        One `tree.walk()`: nodes are dispatched on their exact type (`_node_kind`), CTE names
        and relation aliases are gathered on the way, and the relations, calls and Command
        nodes are then handled in walk order (an UNKNOWN raised at a Command leaves exactly
        the tables and functions met before it collected)."""
        kinds = _NODE_KINDS
        ctes: set[str] = set()
        tables: list[exp.Table] = []
        events: list[tuple[int, Any]] = []  # (kind, node): tables, calls, Command
        node: Any
        for node in tree.walk():
            kind = kinds.get(type(node))
            if kind is None:
                kind = _node_kind(type(node))
            if kind == _K_OTHER:
                continue
            if kind == _K_TABLE:
                tables.append(node)
                events.append((kind, node))
            elif kind == _K_CTE:
                alias = node.args.get("alias")
                if alias is not None and alias.this is not None:
                    ctes.add(ident_name(alias.this))
            elif kind == _K_ANON:
                events.append((kind, node))
            elif not effects:
                continue
            elif kind == _K_FUNC:
                effect = _FUNC_EFFECTS.get(type(node))
                if effect is None:
                    effect = _func_effect(type(node))
                if effect:
                    classes |= effect
            elif kind == _K_DML or kind == _K_LOCK:
                classes.add(C.WRITE)
            elif kind == _K_SELECT:
                if node.args.get("into") is not None:
                    classes |= {C.DDL, C.WRITE}
            elif kind == _K_COMMAND:
                events.append((kind, node))
        candidate = False
        aliases: set[str] | None = None
        model = self.model
        for kind, node in events:
            if kind == _K_TABLE:
                this = node.args.get("this")
                if not isinstance(this, exp.Identifier):
                    continue
                db = node.args.get("db")
                schema = ident_name(db) if db is not None else None
                name = ident_name(this)
                if model.lookup(schema, name):
                    candidate = True  # even if a CTE shadows it: a body may read the table
                if schema is None and name in ctes:
                    continue
                self.acc.tables.add(render((schema, name) if schema else (name,)))
                if schema in (None, "pg_catalog") and name in ADMIN_CATALOGS:
                    classes.add(C.ADMIN)
            elif kind == _K_COMMAND:
                raise _Unknown("a construct sqlglot could not parse (Command) inside the "
                               "statement")
            elif not effects:
                if self.anonymous_is_pii(node):
                    candidate = True
            else:
                if aliases is None:
                    aliases = _relation_aliases(tables)
                self.anonymous(node, classes, aliases)
                if self.anonymous_is_pii(node):
                    candidate = True
        return candidate

    def anonymous_is_pii(self, node: exp.Anonymous) -> bool:
        schema, name = _function_name(node)
        return self.model.pii_function(schema, name) is not None

    def anonymous(self, node: exp.Anonymous, classes: set[StatementClass],
                  aliases: set[str]) -> None:
        schema, name = _function_name(node)
        self.acc.functions.add(render((schema, name) if schema else (name,)))
        effect = side_effect_of(name)
        if effect == "write":
            classes.add(C.WRITE)
            return
        if effect == "admin":
            classes.add(C.ADMIN)
            return
        if schema in (None, "pg_catalog", "information_schema") and \
                self.builtins.is_builtin(schema, name):
            return
        vols = self.function_volatility(schema, name)
        if vols:
            if Volatility.VOLATILE in vols:
                classes.add(C.WRITE)
            return
        if schema is None and len(node.expressions) == 1:
            arg = node.expressions[0]
            if isinstance(arg, exp.Column) and arg.args.get("table") is None and \
                    ident_name(arg.this) in aliases:
                return  # functional notation `email(u)` = `u.email`, a column access
        classes.add(C.WRITE)  # unknown function: counts as VOLATILE (§5)

    def function_volatility(self, schema: str | None, name: str) -> set[Volatility]:
        if self.catalog is None:
            return set()
        if schema is not None:
            v = self.catalog.functions.get((schema, name))
            return {v} if v is not None else set()
        return {v for (s, n), v in self.catalog.functions.items() if n == name}

    def collect_tables(self, tree: exp.Expression) -> None:
        self.effect_walk(tree, set(), effects=False)

    # -- COPY -----------------------------------------------------------------------------------

    def copy(self, chunk: Chunk) -> set[StatementClass]:
        tree = self.parse(chunk)
        if not isinstance(tree, exp.Copy):
            raise _Unknown(f"COPY parsed as {type(tree).__name__}")
        copy_from = bool(tree.args.get("kind"))
        classes: set[StatementClass] = {C.WRITE} if copy_from else set()
        for f in tree.args.get("files") or []:
            if not (isinstance(f, exp.Identifier) and not f.args.get("quoted")
                    and str(f.this).upper() in ("STDIN", "STDOUT")):
                classes.add(C.ADMIN)  # PROGRAM or a server-side file
        target = tree.this
        if isinstance(target, exp.Subquery | exp.Select | exp.SetOperation | exp.Values):
            body = target.this if isinstance(target, exp.Subquery) else target
            if copy_from:
                raise _Unknown("COPY FROM with a query")
            classes |= self.analyse(body, query=True)
        else:
            cols: list[str] | None = None
            table = target
            if isinstance(table, exp.Schema):
                cols = [ident_name(c) for c in table.expressions]
                table = table.this
            if not isinstance(table, exp.Table):
                raise _Unknown("COPY of something that is not a table")
            schema, name = (ident_name(table.args["db"]) if table.args.get("db") else None,
                            ident_name(table.this))
            self.acc.tables.add(render((schema, name) if schema else (name,)))
            if schema in (None, "pg_catalog") and name in ADMIN_CATALOGS:
                classes.add(C.ADMIN)
            matches: set[PiiMatch] = set()
            for rel in self.model.lookup(schema, name):
                for col in (cols if cols is not None and rel.columns is not None else ["*"]):
                    if rel.columns is None or col == "*" or col in rel.columns:
                        c = "*" if rel.columns is None or col == "*" else col
                        matches.add(PiiMatch(f"{render(rel.name)}.{c}", rel.rule))
                        for v in rel.via if c == "*" else ():
                            matches.add(PiiMatch(v, rel.rule))
            if matches:
                classes.add(C.PII)
                self.acc.pii |= matches
            if not copy_from:
                classes.add(C.READ)
        if classes & EFFECT_CLASSES:
            classes.discard(C.READ)
        return classes

    # -- DDL ------------------------------------------------------------------------------------

    def ddl(self, chunk: Chunk, lead: str) -> set[StatementClass]:
        words = [_word(t) for t in chunk.tokens[1:6]]
        if lead == "ALTER" and words[:1] == ["SYSTEM"]:
            return {C.ADMIN}
        classes: set[StatementClass] = {C.DDL}
        if _ddl_is_admin(lead, chunk):
            classes.add(C.ADMIN)
        try:
            tree = parse_chunk(chunk)
        except ParseError:
            tree = None
        if tree is None or isinstance(tree, exp.Command) or any(
                isinstance(n, exp.Command) for n in tree.walk()):
            return classes | self.ddl_fallback(chunk, lead)
        if isinstance(tree, exp.Create) and (
                any(isinstance(n, exp.ExecuteAsProperty) for n in tree.walk())
                or _has_sequence([_word(t) for t in chunk.tokens], ("AS", "EXECUTE"))):
            raise _Unknown("CREATE … AS EXECUTE runs a prepared statement")
        resolver = PiiResolver(self.model)
        query = tree.args.get("expression") if isinstance(tree, exp.Create) else None
        if isinstance(query, exp.Subquery):
            query = query.this
        if not isinstance(query, _QUERY_ROOTS):
            query = None
        resolver.visit_object_tables(tree, query)
        self.collect_tables(tree)
        if query is not None and isinstance(tree, exp.Create):
            kind = str(tree.args.get("kind") or "").upper()
            props = tree.args.get("properties")
            materialized = isinstance(props, exp.Properties) and any(
                isinstance(p, exp.MaterializedProperty) for p in props.expressions)
            if kind == "TABLE" or materialized:
                # CTAS / CREATE MATERIALIZED VIEW: the query executes and fills a table.
                classes |= {C.WRITE}
                classes |= self.analyse(query, query=True) - {C.READ}
            else:
                # A view definition is not executed: PII analysis only.
                resolver.visit_statement(query)
        if resolver.matches:
            classes.add(C.PII)
            self.acc.pii |= resolver.matches
        return classes

    def ddl_fallback(self, chunk: Chunk, lead: str) -> set[StatementClass]:
        """Keyword fallback for DDL sqlglot cannot parse: PII if any identifier token names a
        PII relation, or follows SCHEMA naming a schema that holds one."""
        toks = list(chunk.tokens)
        tail = lumped_tail(chunk)
        if tail is not None:
            toks = [toks[0], *tail.tokens]
        words = [_word(t) for t in toks]
        if lead == "CREATE":
            i = 1
            while i < len(words) and words[i] in ("OR", "REPLACE", "GLOBAL", "LOCAL", "TEMP",
                                                  "TEMPORARY", "UNLOGGED"):
                i += 1
            if i < len(words) and words[i] in ("TABLE", "MATERIALIZED") and \
                    ("AS" in words[i:] or "EXECUTE" in words[i:]):
                raise _Unknown("CREATE TABLE/MATERIALIZED VIEW … AS that could not be parsed "
                               "(it executes a query)")
        resolver = PiiResolver(self.model)
        for i, t in enumerate(toks[1:], start=1):
            if t.token_type in LITERAL_TOKENS:
                continue
            name = _name(t)
            if words[i - 1] == "SCHEMA":
                if name in self.model.schemas:
                    resolver.touch_schema(name)
                continue
            if self.model.lookup(None, name):
                resolver.touch_name(name)
        if resolver.matches:
            self.acc.pii |= resolver.matches
            return {C.PII}
        return set()

    # -- EXPLAIN, PREPARE/EXECUTE, DECLARE/FETCH -------------------------------------------------

    def explain(self, chunk: Chunk) -> set[StatementClass]:
        inner = self.inner_chunk(chunk)
        toks = inner.tokens
        i, analyze = 0, False
        if toks and toks[0].token_type is TokenType.L_PAREN:
            depth = 0
            for j, t in enumerate(toks):
                if t.token_type is TokenType.L_PAREN:
                    depth += 1
                elif t.token_type is TokenType.R_PAREN:
                    depth -= 1
                    if depth == 0:
                        i = j + 1
                        break
                elif _word(t) in ("ANALYZE", "ANALYSE"):
                    analyze = True  # even `ANALYZE off`: fail closed
            else:
                raise _Unknown("EXPLAIN option list not closed")
        else:
            while i < len(toks) and _word(toks[i]) in ("ANALYZE", "ANALYSE", "VERBOSE"):
                analyze = analyze or _word(toks[i]) != "VERBOSE"
                i += 1
        if i >= len(toks):
            raise _Unknown("EXPLAIN without a statement")
        if analyze:
            return self.nested(inner.sub(i), "EXPLAIN ANALYZE")
        # Nothing executes and no values return: READ, but an inner UNKNOWN stays UNKNOWN.
        saved_pii, saved_changes = set(self.acc.pii), list(self.changes)
        self.nested(inner.sub(i), "EXPLAIN")
        self.acc.pii, self.changes = saved_pii, saved_changes
        return {C.READ}

    def nested(self, chunk: Chunk, what: str) -> set[StatementClass]:
        try:
            return self.dispatch(chunk)
        except _Unknown as exc:
            raise _Unknown(f"{what}: {exc}") from None

    def prepare(self, chunk: Chunk) -> set[StatementClass]:
        toks = self.inner_chunk(chunk).tokens
        if toks and _word(toks[0]) == "TRANSACTION":
            return {C.ADMIN}
        if len(toks) < 3:
            raise _Unknown("PREPARE without a body")
        name = _name(toks[0])
        i = 1
        if toks[i].token_type is TokenType.L_PAREN:
            i = _skip_parens(toks, i)
        if i >= len(toks) or _word(toks[i]) != "AS":
            raise _Unknown("PREPARE without AS")
        classes = self.nested(self.inner_chunk(chunk).sub(i + 1), "PREPARE")
        frozen = frozenset(classes)
        self.prepared[name] = frozen
        self.changes.append(SessionChange(ChangeKind.PREPARE, name, frozen))
        return classes

    def execute(self, chunk: Chunk) -> set[StatementClass]:
        self.session_dependent = True
        inner = self.inner_chunk(chunk)
        toks = inner.tokens
        if not toks:
            raise _Unknown("EXECUTE without a name")
        name = _name(toks[0])
        found = [c for c in (self.prepared.get(name), self.facts.prepared.get(name))
                 if c is not None]
        if not found:
            raise _Unknown(f"EXECUTE of a statement this session never prepared ({name})")
        classes: set[StatementClass] = set().union(*found)
        if len(toks) > 1:
            if toks[1].token_type is not TokenType.L_PAREN or \
                    _skip_parens(toks, 1) != len(toks):
                raise _Unknown("EXECUTE with unexpected text after the arguments")
            args = inner.text[toks[2].start:toks[-1].start] if len(toks) > 3 else ""
            if args.strip():
                classes |= self.expression_effects(args)
        return classes

    def expression_effects(self, args: str) -> set[StatementClass]:
        """EXECUTE's arguments are evaluated: classify them as `SELECT args` (minus READ)."""
        text = "SELECT " + args
        chunks = split(text, tokenize(text))
        if len(chunks) != 1:
            raise _Unknown("EXECUTE arguments contain a statement separator")
        return self.query_statement(chunks[0], "SELECT") - {C.READ}

    def declare(self, chunk: Chunk) -> set[StatementClass]:
        inner = self.inner_chunk(chunk)
        toks = inner.tokens
        if not toks:
            raise _Unknown("DECLARE without a name")
        name = _name(toks[0])
        words = [_word(t) for t in toks]
        try:
            cursor_at = words.index("CURSOR")
            for_at = words.index("FOR", cursor_at)
        except ValueError:
            raise _Unknown("DECLARE without CURSOR … FOR") from None
        classes = self.nested(inner.sub(for_at + 1), "DECLARE")
        frozen = frozenset(classes)
        self.cursors[name] = frozen
        self.changes.append(SessionChange(ChangeKind.DECLARE, name, frozen))
        return classes

    def fetch(self, chunk: Chunk) -> set[StatementClass]:
        self.session_dependent = True
        toks = self.inner_chunk(chunk).tokens
        if not toks:
            raise _Unknown("FETCH without a cursor name")
        name = _name(toks[-1])
        found = [c for c in (self.cursors.get(name), self.facts.cursors.get(name))
                 if c is not None]
        if not found:
            raise _Unknown(f"FETCH/MOVE on a cursor this session never declared ({name})")
        return set().union(*found)


def _skip_parens(toks: tuple[Any, ...] | list[Any], i: int) -> int:
    """Index after the parenthesis group opening at `i`."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].token_type is TokenType.L_PAREN:
            depth += 1
        elif toks[j].token_type is TokenType.R_PAREN:
            depth -= 1
            if depth == 0:
                return j + 1
    raise _Unknown("unbalanced parentheses")


def _has_sequence(words: list[str], seq: tuple[str, ...]) -> bool:
    n = len(seq)
    return any(tuple(words[i:i + n]) == seq for i in range(len(words) - n + 1))


def _function_name(node: exp.Anonymous) -> tuple[str | None, str]:
    this = node.this
    name = ident_name(this) if isinstance(this, exp.Identifier) else fold(str(this))
    parent = node.parent
    schema = None
    if isinstance(parent, exp.Dot) and parent.expression is node and \
            isinstance(parent.this, exp.Identifier):
        schema = ident_name(parent.this)
    return schema, name


def _relation_aliases(tables: list[exp.Table]) -> set[str]:
    out: set[str] = set()
    for t in tables:
        alias = t.args.get("alias")
        if isinstance(alias, exp.TableAlias) and alias.this is not None:
            out.add(ident_name(alias.this))
        if isinstance(t.this, exp.Identifier):
            out.add(ident_name(t.this))
    return out


def _ddl_is_admin(lead: str, chunk: Chunk) -> bool:
    toks = list(chunk.tokens)
    words = [_word(t) for t in toks]
    if lead in ("REASSIGN",):
        return True
    if lead == "DROP" and words[1:2] == ["OWNED"]:
        return True
    if lead in ("GRANT", "REVOKE"):
        return "ON" not in words  # role membership
    i = 1
    if lead == "COMMENT":
        i = 2  # COMMENT ON <kind>
    while i < len(words) and words[i] in ("OR", "REPLACE", "TRUSTED", "PROCEDURAL", "IF",
                                          "NOT", "EXISTS"):
        i += 1
    if i < len(words):
        if words[i] in _ADMIN_OBJECTS:
            return True
        if i + 1 < len(words) and (words[i], words[i + 1]) in _ADMIN_OBJECT_PAIRS:
            return True
    return False


def _check_unicode_identifiers(flat: list[FlatToken]) -> None:
    """`U&"…"`: sqlglot reads `U & "…"`, PostgreSQL an escaped identifier → UNKNOWN."""
    for a, b, c in zip(flat, flat[1:], flat[2:], strict=False):
        if a[0] is TokenType.VAR and a[1] in ("U", "u") and b[0] is TokenType.AMP and \
                c[0] is TokenType.IDENTIFIER and a[3] == b[2] and b[3] == c[2]:
            raise _Unknown('U&"…" identifier (sqlglot does not decode it)')


__all__ = ["REDACTED", "Classification", "StatementResult", "classify"]
