"""`pgguard explain` as a user runs it (DESIGN §8): output formats, stdin, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
pii:
  tables: {public.users: [email, phone], public.customers: "*"}
limits: {max_sql_bytes: 200}
"""


def explain(tmp_path: Path, *args: str, stdin: str | None = None,
            config: str = CONFIG) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "pgguard.yaml"
    cfg.write_text(config)
    return subprocess.run([sys.executable, "-m", "pgguard", "explain", "--config", str(cfg),
                           *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_json_object(tmp_path: Path) -> None:
    out = explain(tmp_path, "--json", "SELECT email FROM users WHERE id = 7; COMMIT")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["classes"] == ["pii", "read", "tx"]
    assert [s["classes"] for s in doc["statements"]] == [["pii", "read"], ["tx"]]
    assert doc["statements"][0]["sql"] == "SELECT email FROM users WHERE id = 7"
    assert doc["pii_columns"] == ["public.users.email"] and doc["tables"] == ["users"]
    assert doc["reason"] is None and "7" not in doc["redacted_sql"]
    assert set(doc) >= {"classes", "statements", "tables", "pii_columns", "functions",
                        "fingerprint", "redacted_sql", "reason"}


def test_human_format_and_stdin(tmp_path: Path) -> None:
    out = explain(tmp_path, "-", stdin="SELECT * FROM customers")
    assert out.returncode == 0
    assert "classes:     pii, read" in out.stdout
    assert "public.customers.*  (rule: public.customers)" in out.stdout
    assert "fingerprint:" in out.stdout and "redacted:" in out.stdout


def test_unknown_exits_zero_with_reason(tmp_path: Path) -> None:
    out = explain(tmp_path, "--json", "SELECT 1 -- " + "x" * 300)  # over max_sql_bytes
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["classes"] == ["unknown"] and "max_sql_bytes" in doc["reason"]


def test_batch_keeps_order(tmp_path: Path) -> None:
    batch = tmp_path / "in.jsonl"
    batch.write_text('"SELECT 1"\n"DELETE FROM users"\n"SET ROLE x"\n')
    out = explain(tmp_path, "--batch", str(batch))
    assert out.returncode == 0
    assert [json.loads(line)["classes"] for line in out.stdout.splitlines()] == \
        [["read"], ["pii", "write"], ["admin"]]


@pytest.mark.parametrize("config", ["pii: {tables: {users: 3}}\n", "nonsense_key: 1\n",
                                    "pii: [unclosed\n"])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, config: str) -> None:
    out = explain(tmp_path, "SELECT 1", config=config)
    assert out.returncode == 2
    assert out.stderr.startswith("pgguard: ") and out.stdout == ""
