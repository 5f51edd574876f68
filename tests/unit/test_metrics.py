"""Metrics: the names and label sets of DESIGN §7, read back from the exposition text."""

from __future__ import annotations

import itertools

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pgguard.classify import StatementClass as C
from pgguard.observability import metrics as M
from pgguard.observability.metrics import Metrics, sensitivity


def scrape(m: Metrics) -> dict[str, dict[tuple, float]]:
    """name (without suffix) → {(sample name, sorted labels): value}."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for s in fam.samples:
            out.setdefault(fam.name, {})[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(fams: dict, sample: str, **labels: str) -> float:
    fam = next(f for f in fams if sample.startswith(f))
    return fams[fam][sample, tuple(sorted(labels.items()))]


def test_names_types_and_label_sets() -> None:
    m = Metrics(CollectorRegistry())
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    # The text parser drops `_total` from counter family names.
    expected = {
        "pgguard_client_connections": ("gauge", set()),
        "pgguard_statements": ("counter", {"decision", "sensitivity"}),
        "pgguard_statement_seconds": ("histogram", set()),
        "pgguard_classify_seconds": ("histogram", set()),
        "pgguard_classify_cache": ("counter", {"result"}),
        "pgguard_holds_active": ("gauge", set()),
        "pgguard_hold_seconds": ("histogram", {"outcome"}),
        "pgguard_stepup": ("counter", {"result"}),
        "pgguard_upstream_errors": ("counter", {"kind"}),
        "pgguard_policy_reloads": ("counter", {"result"}),
        "pgguard_audit_errors": ("counter", set()),
    }
    pgguard = {n for n in fams if n.startswith("pgguard_") and not n.endswith("_created")}
    assert pgguard == set(expected)
    for name, (kind, labels) in expected.items():
        assert fams[name].type == kind, name
        for s in fams[name].samples:
            assert set(s.labels) - {"le"} == labels, (name, s)
    assert {n.removesuffix("_total") for n in M.METRIC_NAMES} == set(expected)
    # Process and platform collectors are on the same registry.
    assert "process_cpu_seconds" in fams and "python_info" in fams


def test_every_label_combination_exists_at_zero() -> None:
    fams = scrape(Metrics(CollectorRegistry(), process=False))
    stm = fams["pgguard_statements"]
    for d, s in itertools.product(M.DECISIONS, M.SENSITIVITIES):
        assert stm["pgguard_statements_total", (("decision", d), ("sensitivity", s))] == 0
    assert len([k for k in stm if k[0] == "pgguard_statements_total"]) == 6 * 7
    assert {dict(k[1])["result"] for k in fams["pgguard_stepup"] if k[0].endswith("_total")} == \
        {"success", "bad_code", "replay", "locked", "unknown_session", "not_enrolled"}
    assert {dict(k[1])["kind"] for k in fams["pgguard_upstream_errors"]
            if k[0].endswith("_total")} == {"connect", "tls", "auth", "reset"}
    assert {dict(k[1])["outcome"] for k in fams["pgguard_hold_seconds"]
            if k[0].endswith("_count")} == {"released", "timeout", "cancel", "disconnect",
                                            "shutdown"}
    assert {dict(k[1])["result"] for k in fams["pgguard_policy_reloads"]
            if k[0].endswith("_total")} == {"ok", "error"}
    assert {dict(k[1])["result"] for k in fams["pgguard_classify_cache"]
            if k[0].endswith("_total")} == {"hit", "miss"}


def test_values_after_calls() -> None:
    m = Metrics(CollectorRegistry(), process=False)
    m.client_connections.inc()
    m.client_connections.inc()
    m.client_connections.dec()
    m.count_statement("allowed", frozenset({C.READ}))
    m.count_statement("allowed", frozenset({C.READ, C.PII}))
    m.count_statement("held", frozenset({C.READ, C.PII}))
    m.count_statement("denied", {C.WRITE, C.UNKNOWN})
    m.statements["released", "pii"].inc(2)
    m.statement_seconds.observe(0.003)
    m.classify_seconds.observe(12e-6)
    m.classify_cache["hit"].inc(5)
    m.classify_cache["miss"].inc()
    m.holds_active.inc()
    m.hold_seconds["released"].observe(7.5)
    m.stepup["success"].inc()
    m.stepup["bad_code"].inc(3)
    m.upstream_errors["connect"].inc()
    m.policy_reloads["error"].inc()
    m.audit_errors.inc()
    f = scrape(m)
    assert value(f, "pgguard_client_connections") == 1
    assert value(f, "pgguard_statements_total", decision="allowed", sensitivity="read") == 1
    assert value(f, "pgguard_statements_total", decision="allowed", sensitivity="pii") == 1
    assert value(f, "pgguard_statements_total", decision="held", sensitivity="pii") == 1
    assert value(f, "pgguard_statements_total", decision="denied", sensitivity="unknown") == 1
    assert value(f, "pgguard_statements_total", decision="released", sensitivity="pii") == 2
    assert value(f, "pgguard_statement_seconds_count") == 1
    assert value(f, "pgguard_statement_seconds_bucket", le="0.005") == 1
    assert value(f, "pgguard_statement_seconds_bucket", le="0.0025") == 0
    # Classify buckets resolve microseconds.
    assert value(f, "pgguard_classify_seconds_bucket", le="1e-05") == 0
    assert value(f, "pgguard_classify_seconds_bucket", le="2.5e-05") == 1
    assert value(f, "pgguard_classify_cache_total", result="hit") == 5
    assert value(f, "pgguard_classify_cache_total", result="miss") == 1
    assert value(f, "pgguard_holds_active") == 1
    assert value(f, "pgguard_hold_seconds_sum", outcome="released") == 7.5
    assert value(f, "pgguard_hold_seconds_count", outcome="timeout") == 0
    assert value(f, "pgguard_stepup_total", result="bad_code") == 3
    assert value(f, "pgguard_upstream_errors_total", kind="connect") == 1
    assert value(f, "pgguard_policy_reloads_total", result="error") == 1
    assert value(f, "pgguard_audit_errors_total") == 1
    with pytest.raises(KeyError):
        m.count_statement("maybe", {C.READ})


def test_sensitivity_order() -> None:
    assert sensitivity(frozenset()) == "tx"
    assert sensitivity({C.TX}) == "tx"
    assert sensitivity([C.READ, C.TX]) == "read"
    assert sensitivity({C.READ, C.PII}) == "pii"
    assert sensitivity({C.PII, C.WRITE}) == "write"
    assert sensitivity({C.WRITE, C.DDL}) == "ddl"
    assert sensitivity({C.DDL, C.ADMIN}) == "admin"
    assert sensitivity(frozenset(C)) == "unknown"


def test_no_default_registry_and_two_instances() -> None:
    before = set(REGISTRY._names_to_collectors)
    Metrics(CollectorRegistry())
    Metrics(CollectorRegistry())
    assert set(REGISTRY._names_to_collectors) == before
