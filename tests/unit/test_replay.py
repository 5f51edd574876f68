"""`pgguard replay`: re-deciding recorded statements under a new policy (issue 5 item 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pgguard.classify import CatalogSnapshot, classify
from pgguard.classify.rules import PiiRules
from pgguard.cli import cli
from pgguard.config import load_config
from pgguard.localpg import free_port
from pgguard.observability.audit import STATEMENT, AuditConfig, AuditSink
from pgguard.observability.audit_files import verify_files
from pgguard.observability.replay import outcome_of, replay, replayable_sql
from pgguard.policy import decide

ROOT = Path(__file__).resolve().parents[2]

OLD = """\
pii: {tables: {public.users: [email]}}
roles:
  oncall: {users: [app], allow: [read, write, pii, tx], step_up: {pii: 30m}}
  analyst: {users: [ana], allow: [read, pii, tx]}
"""
NEW = """\
pii: {tables: {public.users: [email, name]}}
roles:
  oncall: {users: [app], allow: [read, write, pii, tx], step_up: {pii: 30m, write: 10m}}
  analyst: {users: [ana], allow: [read, tx]}
"""

_KIND_TO_RECORDED = {"allow": "allowed", "deny": "denied", "step_up": "held"}


def _trail(tmp_path: Path, statements: list[tuple[str, str]], config_text: str = OLD) -> Path:
    """An audit trail as the proxy writes it: each (user, sql) decided by `config_text`."""
    cfg_path = tmp_path / "old.yaml"
    cfg_path.write_text(config_text)
    cfg = load_config(cfg_path)
    path = tmp_path / "audit.jsonl"
    sink = AuditSink(AuditConfig(path=path, fsync="every"))
    sink.start()
    for user, sql in statements:
        c = classify(sql, cfg.pii_rules)
        d = decide(cfg.policy, user, c, {}, 0.0)
        sink.emit(STATEMENT, session="s1", user=user, classification=c,
                  decision=_KIND_TO_RECORDED[d.kind], rule=d.rule, sql=sql)
    assert sink.flush_sync()
    sink.close_sync()
    return path


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_placeholder_becomes_a_neutral_literal_outside_identifiers_and_comments() -> None:
    assert replayable_sql("select * from t where a = <redacted> and b in (<redacted>)") == \
        "select * from t where a = '' and b in ('')"
    kept = 'select "<redacted>" from t -- <redacted>\n/* <redacted> */ where x = <redacted>'
    assert replayable_sql(kept) == \
        'select "<redacted>" from t -- <redacted>\n/* <redacted> */ where x = \'\''


def test_redacted_corpus_classifies_as_the_original() -> None:
    """The neutral literal keeps every case of the classification corpus in its class set."""
    corpus = yaml.safe_load((ROOT / "tests/corpus/classify.yaml").read_text())
    rules = PiiRules.from_config(corpus["pii"])
    catalog = CatalogSnapshot.from_mapping(corpus["catalog"])
    for case in corpus["cases"]:
        original = classify(case["sql"], rules, catalog)
        again = classify(replayable_sql(original.redacted_sql), rules, catalog)
        assert again.classes == original.classes, case["sql"]


@pytest.mark.parametrize(("decision", "rule", "outcome"), [
    ("allowed", "roles.a.allow", "allow"),
    ("allowed", "roles.a.step_up.pii", "step_up"),      # a grant covered it
    ("denied", "roles.a.allow", "deny"),
    ("denied", "roles.a.step_up.write", "step_up"),     # no authenticator
    ("held", "roles.a.step_up.pii", "step_up"),
    ("released", "roles.a.step_up.pii", "step_up"),
    ("timed_out", "roles.a.step_up.pii", "step_up"),
    ("canceled", "roles.a.step_up.pii", "step_up"),
    ("bogus", None, None),
])
def test_recorded_decisions_map_to_policy_outcomes(decision: str, rule: str | None,
                                                   outcome: str | None) -> None:
    assert outcome_of(decision, rule) == outcome


def test_replay_reports_only_changed_decisions(tmp_path: Path) -> None:
    trail = _trail(tmp_path, [
        ("app", "select name from users where id = 5"),              # allow → step_up (pii)
        ("app", "select email from users where email = 'bob@x.org'"),  # step_up, unchanged
        ("app", "delete from orders where id = 3"),                   # allow → step_up (write)
        ("app", "select 1"),                                          # allow, unchanged
        ("ana", "select email from users"),                           # allow → deny
    ])
    assert "bob@x.org" not in trail.read_text()
    new_path = tmp_path / "new.yaml"
    new_path.write_text(NEW)
    report = replay(_events(trail), load_config(new_path))
    assert report.statements == 5
    got = [(r.id, r.user, r.old, r.new) for r in report.changed]
    assert got == [(1, "app", "allow", "step_up"), (3, "app", "allow", "step_up"),
                   (5, "ana", "allow", "deny")]
    assert report.changed[2].rule == "roles.analyst.allow"
    assert report.changed[0].classes == ("pii", "read")


def test_same_policy_changes_nothing_even_for_unshown_statements(tmp_path: Path) -> None:
    trail = _trail(tmp_path, [("app", "select email from users"), ("app", "select 1"),
                              ("app", "select 'unterminated")])
    events = _events(trail)
    assert events[2]["classes"] == ["unknown"]
    report = replay([*events, {"event": "session.start", "user": "app"}],
                    load_config(tmp_path / "old.yaml"))
    assert (report.statements, report.changed, report.skipped) == (3, [], 0)


def test_cli_table_json_and_exit_codes(tmp_path: Path) -> None:
    trail = _trail(tmp_path, [("app", "select name from users where id = 5"),
                              ("app", "select 1")])
    new_path = tmp_path / "new.yaml"
    new_path.write_text(NEW)
    runner = CliRunner()
    r = runner.invoke(cli, ["replay", str(trail), "--config", str(new_path)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["ID", "USER", "DECISION", "RULE", "SQL"]
    assert lines[1].split()[:5] == ["1", "app", "allow", "→", "step_up"]
    assert "select name from users where id = <redacted>" in lines[1]
    assert lines[-1] == "1 of 2 recorded statements would be decided differently"

    r = runner.invoke(cli, ["replay", str(trail), "--config", str(new_path), "--json"])
    assert r.exit_code == 0
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(o["id"], o["old"], o["new"], o["recorded"]) for o in objs] == \
        [(1, "allow", "step_up", "allowed")]

    bad = tmp_path / "bad.yaml"
    bad.write_text("roles: {x: {allow: [nope]}}\n")
    r = runner.invoke(cli, ["replay", str(trail), "--config", str(bad)])
    assert r.exit_code == 2
    r = runner.invoke(cli, ["replay", str(tmp_path / "missing.jsonl"), "--config", str(new_path)])
    assert r.exit_code == 2
    junk = tmp_path / "junk"
    junk.write_text("not json\n")
    r = runner.invoke(cli, ["replay", str(junk), "--config", str(new_path)])
    assert r.exit_code == 2
    assert "no audit events found" in r.stderr


def test_run_with_a_corrupt_trail_exits_2_with_one_line(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"id": 1, "hash": "ab"}\nthis line was edited\n')
    cfg = tmp_path / "pgguard.yaml"
    port, admin = free_port(), free_port()
    cfg.write_text(f"listen: 127.0.0.1:{port}\nupstream: 127.0.0.1:1\n"
                   f"admin: {{listen: 127.0.0.1:{admin}}}\naudit: {{path: {audit}}}\n")
    p = subprocess.run([sys.executable, "-m", "pgguard", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("pgguard: ") and "last line is not JSON" in p.stderr


def test_two_writers_keep_one_chain_across_rotation(tmp_path: Path) -> None:
    """`pgguard enroll` appends while the proxy writes: the flock and re-read keep the chain."""
    path = tmp_path / "audit.jsonl"
    proxy = AuditSink(AuditConfig(path=path, fsync="every", rotate_bytes=1500))
    proxy.start()
    try:
        for i in range(12):
            proxy.emit("session.start", session=f"s{i}", user="app")
            assert proxy.flush_sync()
            if i % 3 == 1:
                other = AuditSink(AuditConfig(path=path, fsync="every"))
                other.start()
                other.emit("enroll", user=f"u{i}", action="enroll", replaced=False)
                assert other.flush_sync()
                other.close_sync()
    finally:
        proxy.close_sync()
    from pgguard.observability.audit import rotated_files

    series = [*rotated_files(path), path]
    assert len(series) > 2
    result = verify_files(series)
    assert result.ok, result.message()
    events = [json.loads(line) for p in series for line in p.read_text().splitlines()]
    assert [e["id"] for e in events] == list(range(1, 17))
    assert sum(e["event"] == "enroll" for e in events) == 4
