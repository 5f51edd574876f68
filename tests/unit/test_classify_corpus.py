"""Every case of tests/corpus/classify.yaml through `classify()` with the header's pii, catalog
and session as inputs (CLASSIFICATION.md; the corpus is a copy of ../shared/corpus)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pgguard.classify import CatalogSnapshot, PiiRules, SessionFacts, StatementClass, classify

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "classify.yaml"
DOC: dict[str, Any] = yaml.safe_load(CORPUS.read_text())
CASES: list[dict[str, Any]] = DOC["cases"]
RULES = PiiRules.from_config(DOC["pii"])
CATALOG = CatalogSnapshot.from_mapping(DOC["catalog"])


def accepted(case: dict[str, Any]) -> list[set[str]]:
    return [set(case["expect_classes"])] + [set(a) for a in case.get("also_accept", [])]


def expected_pii_columns(used: list[str]) -> set[str]:
    """pii_rules_used entries as `Classification.pii_columns` spells them."""
    out = set()
    for u in used:
        if u.startswith("builtin:"):
            out.add(f"pg_catalog.{u.removeprefix('builtin:')}.*")
        elif u.startswith("view:"):
            out.add(f"{u.removeprefix('view:')}.*")
        elif u.startswith("functions:"):
            out.add(f"{u.removeprefix('functions:')}()")
        else:
            out.add(u)
    return out


def test_corpus_is_complete() -> None:
    assert DOC["version"] == 1
    assert len(CASES) >= 133
    assert set(DOC["classes"]) == {c.value for c in StatementClass}


@pytest.mark.parametrize("case", CASES, ids=[f"{i:03d}" for i in range(len(CASES))])
def test_case(case: dict[str, Any]) -> None:
    result = classify(case["sql"], RULES, CATALOG, SessionFacts.from_mapping(DOC["session"]))
    got = {c.value for c in result.classes}
    assert got in accepted(case), (case["sql"], got, result.reason, case["note"])
    assert set(result.classes) == set().union(*(s.classes for s in result.statements)) \
        if result.statements else not result.classes
    if StatementClass.UNKNOWN in result.classes:
        assert result.reason
    else:
        assert result.reason is None
        # Every rule the corpus names is reported (more may be: a view names all its columns).
        assert expected_pii_columns(case["pii_rules_used"]) <= set(result.pii_columns)
        assert (StatementClass.PII in result.classes) == bool(result.pii_columns)


def test_no_case_is_fail_open() -> None:
    """A sensitive statement (anything beyond read/tx) must never come out as plain read."""
    session = SessionFacts.from_mapping(DOC["session"])
    for case in CASES:
        want = set(case["expect_classes"])
        got = {c.value for c in classify(case["sql"], RULES, CATALOG, session).classes}
        if want - {"read", "tx"}:
            assert got - {"read", "tx"}, case["sql"]
