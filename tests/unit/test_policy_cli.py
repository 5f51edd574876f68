"""`pgguard policy check FILE` and `pgguard explain --user U` as a user runs them (DESIGN §8)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

POLICY = """\
pii:
  tables: {public.users: [email, phone]}
roles:
  analyst: {users: ["analyst_*"], allow: [read, tx, pii], step_up: [pii]}
  oncall:
    users: [alice, bob]
    allow: [read, write, pii, tx, unknown]
    step_up: {pii: 30m, write: 10m, unknown: 0s}
default_role: analyst
"""


def pgguard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgguard", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_policy_check_ok(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    out = pgguard("policy", "check", "p.yaml", cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, "ok\n", "")


def test_policy_check_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY.replace("[read, tx, pii]", "[read, tx]")
                                     .replace("default_role: analyst", "default_role: dba"))
    out = pgguard("policy", "check", "p.yaml", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "p.yaml:4: roles.analyst.step_up[0]: pii is not in allow",
        "p.yaml:9: default_role: 'dba' names no role (roles: analyst, oncall)",
    ]


def test_policy_check_missing_file(tmp_path: Path) -> None:
    out = pgguard("policy", "check", "nope.yaml", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr == "nope.yaml: no such config file\n"


def explain(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pgguard.yaml").write_text(POLICY)
    return pgguard("explain", "--config", "pgguard.yaml", *args, cwd=tmp_path)


def test_explain_user_json_step_up(tmp_path: Path) -> None:
    out = explain(tmp_path, "--json", "--user", "alice", "SELECT email FROM users")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["classes"] == ["pii", "read"]
    assert doc["role"] == "oncall" and doc["matched_by"] == "roles.oncall.users"
    assert doc["decision"] == "step_up" and doc["rule"] == "roles.oncall.step_up.pii"
    assert doc["message"] == \
        "pgguard: statement held: step-up required (pii: public.users.email)"


def test_explain_user_json_deny_and_allow(tmp_path: Path) -> None:
    deny = json.loads(explain(tmp_path, "--json", "--user", "alice", "DROP TABLE t").stdout)
    assert (deny["decision"], deny["rule"]) == ("deny", "roles.oncall.allow")
    assert deny["message"] == "pgguard: role oncall may not run ddl (t)"
    allow = json.loads(explain(tmp_path, "--json", "--user", "carol", "SELECT 1").stdout)
    assert allow["role"] == "analyst" and allow["matched_by"] == "default_role"
    assert (allow["decision"], allow["rule"], allow["message"]) == \
        ("allow", "roles.analyst.allow", None)


def test_explain_without_user_has_no_policy_fields(tmp_path: Path) -> None:
    doc = json.loads(explain(tmp_path, "--json", "SELECT 1").stdout)
    assert not {"role", "decision", "rule"} & set(doc)


def test_explain_user_human_output(tmp_path: Path) -> None:
    out = explain(tmp_path, "--user", "carol", "SELECT email FROM users")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "role:        analyst (default_role)" in lines
    assert "decision:    step_up" in lines
    assert "rule:        roles.analyst.step_up.pii" in lines
    assert ("message:     pgguard: statement held: step-up required (pii: public.users.email)"
            in lines)


def test_explain_user_batch(tmp_path: Path) -> None:
    batch = tmp_path / "in.jsonl"
    batch.write_text('"SELECT 1"\n"DELETE FROM orders"\n"VACUUM"\n')
    out = explain(tmp_path, "--user", "bob", "--batch", str(batch))
    assert out.returncode == 0, out.stderr
    docs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(d["decision"], d["rule"]) for d in docs] == [
        ("allow", "roles.oncall.allow"),
        ("step_up", "roles.oncall.step_up.write"),
        ("deny", "roles.oncall.allow"),
    ]
