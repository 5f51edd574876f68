"""Statement classification: SQL text (+ PII rules, catalog snapshot, session facts) →
`Classification` (DESIGN §4; the rules are CLASSIFICATION.md). Pure: no I/O, no asyncio.

How the proxy uses it (one `ClassificationCache` per process, one `SessionFacts` per session):

    rules = PiiRules.from_config(config.pii)
    cache = ClassificationCache(rules, catalog=None, max_sql_bytes=config.limits.max_sql_bytes)
    facts = SessionFacts()                       # per client session
    facts.standard_conforming_strings = ...      # from the server's ParameterStatus

    c = cache.classify(sql_text, facts)                       # at every Query
    c = cache.classify(sql_text, facts, parse_message=True)   # at every Parse (one statement)
    c.classes            # frozenset[StatementClass]: decide on these
    c.reason             # why UNKNOWN (None otherwise)
    c.pii_columns, c.tables, c.functions, c.fingerprint, c.redacted_sql  # notice / audit
    facts.apply(c.session_changes)             # once the message is forwarded (PREPARE, DECLARE,
                                               # DEALLOCATE, CLOSE, DISCARD ALL)
    facts.record_prepared(stmt_name, c.classes)  # a named Parse: EXECUTE name looks it up
    cache.update(rules=new_rules)              # hot reload; cache.update(catalog=snapshot) on
                                               # catalog refresh (pgguard.state.catalog)

`classify(sql, rules, catalog=None, session=None)` is the uncached function underneath.
"""

from pgguard.classify.cache import CacheStats, ClassificationCache
from pgguard.classify.catalog import CatalogSnapshot, Volatility
from pgguard.classify.classes import StatementClass
from pgguard.classify.classifier import REDACTED, Classification, StatementResult, classify
from pgguard.classify.pii import PiiMatch
from pgguard.classify.rules import PiiRules
from pgguard.classify.session import ChangeKind, SessionChange, SessionFacts

__all__ = [
    "REDACTED",
    "CacheStats",
    "CatalogSnapshot",
    "ChangeKind",
    "Classification",
    "ClassificationCache",
    "PiiMatch",
    "PiiRules",
    "SessionChange",
    "SessionFacts",
    "StatementClass",
    "StatementResult",
    "Volatility",
    "classify",
]
