"""SET / RESET by name (CLASSIFICATION §4). Never trust sqlglot's `exp.Set`: `SET "role" = 'x'`
and `SET session_authorization = 'x'` parse as harmless-looking assignments.

A role change in any syntax is ADMIN; transaction and harmless session settings are TX; every
other GUC, and every custom (dotted) GUC, which may feed row-level-security policies, is ADMIN.
"""

from __future__ import annotations

import re

from pgguard.classify.classes import StatementClass

C = StatementClass

# GUCs a client may set without changing privileges or data visibility: enough for the start-up
# SETs of psql, pgjdbc, asyncpg and psycopg.
ALLOWED_GUCS: frozenset[str] = frozenset({
    "application_name", "client_encoding", "datestyle", "timezone", "intervalstyle",
    "extra_float_digits", "statement_timeout", "lock_timeout",
    "idle_in_transaction_session_timeout", "idle_session_timeout", "client_min_messages",
    "search_path", "bytea_output", "transaction_isolation", "default_transaction_isolation",
    "transaction_read_only", "default_transaction_read_only", "transaction_deferrable",
    "default_transaction_deferrable", "work_mem", "temp_buffers", "jit", "plan_cache_mode",
    "effective_cache_size", "max_parallel_workers_per_gather", "geqo", "lc_monetary",
    "lc_numeric", "lc_time", "xmlbinary", "xmloption", "default_text_search_config",
})
ALLOWED_GUC_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^enable_[a-z_]+$"),
    re.compile(r"^[a-z_]+_cost$"),
    re.compile(r"^[a-z_]+_collapse_limit$"),
)
ROLE_GUCS = frozenset({"role", "session_authorization"})
# Keyword forms after SET/RESET [SESSION|LOCAL] that are session/transaction control.
_TX_FORMS = frozenset({"TRANSACTION", "CONSTRAINTS", "NAMES", "SCHEMA"})

Word = tuple[str, str, bool]  # (unquoted keyword text upper-cased or "", identifier name, quoted)


def classify_set(words: list[Word]) -> StatementClass:
    """Class of `SET …` / `RESET …` given the words after the leading keyword."""
    if not words:
        return C.ADMIN
    kw = [w[0] if not w[2] else "" for w in words]
    if kw[0] == "SESSION" and len(kw) > 1 and kw[1] == "AUTHORIZATION":
        return C.ADMIN
    if kw[0] == "SESSION" and len(kw) > 1 and kw[1] == "CHARACTERISTICS":
        return C.TX
    i = 1 if kw[0] in ("SESSION", "LOCAL") else 0
    if i >= len(words):
        return C.ADMIN
    head = kw[i]
    if head == "ROLE":
        return C.ADMIN
    if head == "SESSION" and i + 1 < len(kw) and kw[i + 1] == "AUTHORIZATION":
        return C.ADMIN
    if head in _TX_FORMS or head == "ALL":
        return C.TX
    if head == "TIME" and i + 1 < len(kw) and kw[i + 1] == "ZONE":
        return C.TX
    if head == "XML" and i + 1 < len(kw) and kw[i + 1] == "OPTION":
        return C.TX
    name = words[i][1]
    if not name:
        return C.ADMIN
    if i + 1 < len(words) and words[i + 1][0] == ".":
        return C.ADMIN  # custom GUC (app.tenant_id): feeds RLS policies
    if name in ROLE_GUCS:
        return C.ADMIN
    # GUC names are case-insensitive in PostgreSQL even when quoted.
    lname = name.lower()
    if lname in ROLE_GUCS:
        return C.ADMIN
    if lname in ALLOWED_GUCS or any(p.match(lname) for p in ALLOWED_GUC_PATTERNS):
        return C.TX
    return C.ADMIN


def guc_is_harmless(name: str) -> bool:
    """A setting by name (startup parameters, `options=-c name=value`): TX or not (§4, §7)."""
    lname = name.lower()
    if "." in lname or lname in ROLE_GUCS:
        return False
    return lname in ALLOWED_GUCS or any(p.match(lname) for p in ALLOWED_GUC_PATTERNS)
