"""Schema-aware mode against a real PostgreSQL: the corpus's schema_sql loaded into a fresh
database, `pgguard explain --batch` run as a subprocess with `catalog.dsn`, every case checked;
plus column-comment tagging, a view exposing PII, and renamed PII columns reported on refresh."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pgguard.classify import PiiRules
from pgguard.localpg import LocalPostgres
from pgguard.state.catalog import diff_pii_columns, load_catalog, validate_rules

ROOT = Path(__file__).resolve().parent.parent.parent
CORPUS: dict[str, Any] = yaml.safe_load((ROOT / "tests" / "corpus" / "classify.yaml").read_text())

EXTRA_SQL = """
CREATE TABLE public.profiles (id int PRIMARY KEY, nickname text, iban text);
COMMENT ON COLUMN public.profiles.iban IS 'bank account (pgguard:pii)';
COMMENT ON COLUMN public.profiles.nickname IS 'shown publicly';
CREATE VIEW public.phone_book AS SELECT u.id, upper(u.phone) AS tel FROM public.users u;
CREATE VIEW public.profile_ids AS SELECT id FROM public.profiles;
CREATE VIEW public.profile_iban AS SELECT id, iban FROM public.profiles;
CREATE VIEW public.over_view AS SELECT id FROM public.phone_book;
"""

EXTRA_CASES: list[tuple[str, set[str]]] = [
    ("SELECT iban FROM profiles", {"read", "pii"}),          # tagged by comment only
    ("SELECT id, nickname FROM profiles", {"read"}),
    ("SELECT * FROM profiles", {"read", "pii"}),
    ("SELECT id FROM phone_book", {"read", "pii"}),          # view exposing users.phone
    ("SELECT id FROM profile_ids", {"read"}),
    ("SELECT id FROM profile_iban", {"read", "pii"}),        # view over a tagged column
    ("SELECT id FROM over_view", {"read", "pii"}),           # view over a PII view
]


def _idempotent_roles(sql: str) -> str:
    # Roles are cluster-wide: make CREATE ROLE safe to repeat in another database.
    return re.sub(r"CREATE ROLE (\w+)([^;]*);",
                  lambda m: ("DO $r$ BEGIN CREATE ROLE " + m.group(1) + m.group(2) +
                             "; EXCEPTION WHEN duplicate_object THEN NULL; END $r$;"), sql)


def _fresh_db(pg: LocalPostgres) -> tuple[str, str]:
    db = f"classify_{secrets.token_hex(4)}"
    pg.psql(f"CREATE DATABASE {db} OWNER app")
    pg.psql(_idempotent_roles(CORPUS["catalog"]["schema_sql"]) + EXTRA_SQL, dbname=db)
    pg.psql("GRANT USAGE ON SCHEMA billing TO app", dbname=db)
    dsn = f"postgresql://app:{pg.password}@127.0.0.1:{pg.port}/{db}"
    return db, dsn


def _run_batch(tmp_path: Path, dsn: str, sqls: list[str]) -> list[dict[str, Any]]:
    config = tmp_path / "pgguard.yaml"
    config.write_text(yaml.safe_dump({"pii": CORPUS["pii"],
                                      "catalog": {"dsn": dsn, "comment_tag": "pgguard:pii"}}))
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(s) + "\n" for s in sqls))
    out = subprocess.run([sys.executable, "-m", "pgguard", "explain", "--config", str(config),
                          "--batch", str(batch)], capture_output=True, text=True, timeout=240,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == len(sqls)
    return lines


def test_corpus_in_schema_aware_mode(pg: LocalPostgres, tmp_path: Path) -> None:
    _db, dsn = _fresh_db(pg)
    cases = CORPUS["cases"]
    sqls = [c["sql"] for c in cases] + [s for s, _ in EXTRA_CASES]
    results = _run_batch(tmp_path, dsn, sqls)
    failures = []
    for case, res in zip(cases, results[:len(cases)], strict=True):
        ok = [set(case["expect_classes"])] + [set(a) for a in case.get("also_accept", [])]
        if set(res["classes"]) not in ok:
            failures.append((case["sql"], res["classes"], res["reason"]))
    for (sql, want), res in zip(EXTRA_CASES, results[len(cases):], strict=True):
        if set(res["classes"]) != want:
            failures.append((sql, res["classes"], res["reason"]))
    assert not failures
    by_sql = dict(zip(sqls, results, strict=True))
    assert "public.profiles.iban" in by_sql["SELECT iban FROM profiles"]["pii_columns"]
    assert {"rule": "comment:pgguard:pii", "column": "public.profiles.iban"} in \
        by_sql["SELECT iban FROM profiles"]["pii_rules"]
    assert "public.phone_book.*" in by_sql["SELECT id FROM phone_book"]["pii_columns"]
    assert "public.users.phone" in by_sql["SELECT id FROM phone_book"]["pii_columns"]


def test_bad_catalog_dsn_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "pgguard.yaml"
    config.write_text(yaml.safe_dump({"catalog": {"dsn": "postgresql://nobody@127.0.0.1:1/x"}}))
    out = subprocess.run([sys.executable, "-m", "pgguard", "explain", "--config", str(config),
                          "SELECT 1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("pgguard: catalog.dsn: cannot load the catalog")
    assert len(out.stderr.strip().splitlines()) == 1


def test_refresh_reports_renamed_and_dropped_pii_columns(pg: LocalPostgres) -> None:
    db, dsn = _fresh_db(pg)
    rules = PiiRules.from_config(CORPUS["pii"])
    old = asyncio.run(load_catalog(dsn))
    assert validate_rules(rules, old) == []
    assert ("public", "users") in old.relations and ("public", "user_contacts") in old.views
    assert old.functions[("public", "archive_user")].value == "volatile"
    pg.psql("ALTER TABLE public.users RENAME COLUMN phone TO mobile;"
            "ALTER TABLE billing.cards DROP COLUMN cvv;"
            "COMMENT ON COLUMN public.profiles.iban IS 'bank account';", dbname=db)
    new = asyncio.run(load_catalog(dsn))
    assert new.version != old.version
    changes = {c.column: c.why for c in diff_pii_columns(rules, old, new)}
    assert set(changes) == {"public.users.phone", "billing.cards.cvv", "public.profiles.iban"}
    assert "comment" in changes["public.profiles.iban"]
    problems = validate_rules(rules, new)
    assert any("public.users.phone" in p for p in problems)
    assert any("billing.cards.cvv" in p for p in problems)
