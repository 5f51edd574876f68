"""pgguard.yaml validation (DESIGN §5, §8): every error with file:line and key path, all at once;
durations, sizes, relative paths; the policy built from `roles`; reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgguard.classify import StatementClass
from pgguard.config import (
    Config,
    HostPort,
    load_config,
    parse_duration,
    parse_size,
    reload_config,
)
from pgguard.errors import ConfigError
from pgguard.policy import ALL_CLASSES

C = StatementClass

# DESIGN §5, verbatim.
DESIGN_EXAMPLE = """\
listen: 127.0.0.1:6433
upstream: /var/run/postgresql                 # or host:port, or postgresql://host:port
upstream_tls: {mode: disable}                 # TCP upstream only
auth: {allow_trust: false}
admin: {listen: 127.0.0.1:9433, public_url: https://pgguard.example.com, token_file: admin.token}
tls: {mode: allow, cert: server.crt, key: server.key}
state: sqlite:////var/lib/pgguard/state.db    # four slashes: absolute path
audit: {path: audit.jsonl, include_literals: false, fsync: interval, rotate_bytes: 256MiB}
pii:
  tables: {public.users: [email, phone, ssn], public.customers: "*"}
  functions: [public.get_user_email]          # functions that return PII
catalog: {dsn: postgresql://pgguard@127.0.0.1/app, refresh: 5m, comment_tag: "pgguard:pii"}
roles:
  analyst: {users: ["analyst_*"], allow: [read, tx, pii], step_up: [pii]}  # list: default ttl
  oncall:  {users: [alice, bob], allow: [read, write, pii, tx, unknown],
            step_up: {pii: 30m, write: 10m, unknown: 0s}}
  dba:     {users: [postgres], allow: all, step_up: {ddl: 0s, admin: 0s, pii: 15m, unknown: 0s}}
default_role: analyst
hold: {timeout: 120s}
stepup: {scope: client, default_ttl: 15m,
         lockout: {failures: 5, window: 5m, duration: 5m, user_failures: 20}}
secrets: {key_file: pgguard.key}
limits: {max_message_bytes: 1GiB, max_sql_bytes: 1MiB, startup_timeout: 10s}
shutdown: {grace: 30s}
"""


def write(tmp_path: Path, text: str, name: str = "pgguard.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(tmp_path: Path, text: str) -> list[str]:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    return [line.removeprefix(f"{p}:") for line in str(info.value).splitlines()]


def test_design_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DESIGN_EXAMPLE))
    assert [r.name for r in cfg.policy.roles] == ["analyst", "oncall", "dba"]
    assert cfg.policy.default_role == "analyst" and cfg.policy.configured
    analyst, oncall, dba = cfg.policy.roles
    assert analyst.users == ("analyst_*",)
    assert analyst.allow == {C.READ, C.TX, C.PII}
    assert dict(analyst.step_up) == {C.PII: 900.0}          # list → stepup.default_ttl
    assert dict(oncall.step_up) == {C.PII: 1800.0, C.WRITE: 600.0, C.UNKNOWN: 0.0}
    assert dba.allow == ALL_CLASSES and C.UNKNOWN in dba.allow
    assert dba.step_up[C.DDL] == 0.0                         # ttl 0 stays representable
    assert cfg.hold_timeout == 120.0
    assert cfg.stepup.scope == "client" and cfg.stepup.default_ttl == 900.0
    lock = cfg.stepup.lockout
    assert (lock.failures, lock.window, lock.duration, lock.user_failures) == (5, 300, 300, 20)
    assert cfg.state.kind == "sqlite" and cfg.state.path == "/var/lib/pgguard/state.db"
    assert cfg.audit.path == str(tmp_path / "audit.jsonl")
    assert cfg.audit.rotate_bytes == 256 << 20 and cfg.audit.fsync == "interval"
    assert cfg.admin.listen == HostPort("127.0.0.1", 9433)
    assert cfg.admin.token_file == str(tmp_path / "admin.token")
    assert cfg.admin.base_url == "https://pgguard.example.com"
    assert cfg.secrets_key_file == str(tmp_path / "pgguard.key")
    assert cfg.tls.cert == str(tmp_path / "server.crt")
    assert cfg.limits.max_message_bytes == 1 << 30 and cfg.limits.max_sql_bytes == 1 << 20
    assert cfg.upstream.unix_path == "/var/run/postgresql/.s.PGSQL.5432"
    assert cfg.pii_rules.functions and len(cfg.pii_rules.tables) == 2


def test_defaults_without_file_sections(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "listen: 127.0.0.1:7000\n"))
    assert not cfg.policy.configured
    assert cfg.policy.role_for("anyone") is not None
    assert cfg.hold_timeout == 120.0 and cfg.stepup.scope == "client"
    assert cfg.admin.listen == HostPort("127.0.0.1", 9433)
    assert cfg.admin.base_url == "http://127.0.0.1:9433"
    assert cfg.state.path == str(tmp_path / "state.db")
    assert cfg.secrets_key_file == str(tmp_path / "pgguard.key")


def test_relative_paths_are_relative_to_the_config_folder(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = write(conf_dir, "state: sqlite:///data/s.db\naudit: {path: logs/a.jsonl}\n"
                        "secrets: {key_file: k.key}\nupstream_tls: {mode: require, ca: ca.pem}\n")
    cfg = load_config(Path(os.path.relpath(p, elsewhere)))
    assert cfg.state.path == str(conf_dir / "data" / "s.db")
    assert cfg.audit.path == str(conf_dir / "logs" / "a.jsonl")
    assert cfg.secrets_key_file == str(conf_dir / "k.key")
    assert cfg.upstream_tls.ca == str(conf_dir / "ca.pem")


@pytest.mark.parametrize(("value", "kind", "where"), [
    ("sqlite:///state.db", "sqlite", "{dir}/state.db"),
    ("sqlite:////abs/state.db", "sqlite", "/abs/state.db"),
    ("plain.db", "sqlite", "{dir}/plain.db"),
    ("/abs/plain.db", "sqlite", "/abs/plain.db"),
    ("postgresql://pg@db/pgguard", "postgresql", "postgresql://pg@db/pgguard"),
])
def test_state_forms(tmp_path: Path, value: str, kind: str, where: str) -> None:
    cfg = load_config(write(tmp_path, f"state: {value}\n"))
    assert cfg.state.kind == kind
    assert (cfg.state.path or cfg.state.dsn) == where.format(dir=tmp_path)


@pytest.mark.parametrize(("text", "seconds"), [
    ("15m", 900.0), ("30s", 30.0), ("0s", 0.0), ("250ms", 0.25), ("2h", 7200.0), ("1d", 86400.0),
    ("1.5m", 90.0), (45, 45.0), ("10", 10.0),
])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["15 minutes", "-1s", -3, True, "", "m"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [
    ("64MiB", 64 << 20), ("1GiB", 1 << 30), ("10kB", 10_000), ("512", 512), (512, 512),
    ("3 B", 3),
])
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["1XB", "1.5MiB", -1, False, "MiB"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


# -- errors: each kind names file, line and key path ------------------------------------------

ROLE_OK = "roles:\n  r: {users: [a], allow: [read]}\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("listen: 1.2.3.4:6433\nlisen: x\n", "2: lisen: unknown key (did you mean listen?)"),
    ("hold:\n  timeout: 5s\n  tmeout: 5s\n", "3: hold.tmeout: unknown key (did you mean timeout?)"),
    ("hold: 5s\n", "1: hold: expected a mapping"),
    ("tls: {mode: maybe}\n", "1: tls.mode: expected one of disable, allow, require, got 'maybe'"),
    ("hold:\n  timeout: soon\n",
     "2: hold.timeout: expected a duration such as 30s or 15m, got 'soon'"),
    ("hold: {timeout: 0s}\n", "1: hold.timeout: must be above 0, got '0s'"),
    ("limits: {max_sql_bytes: 1XB}\n",
     "1: limits.max_sql_bytes: expected a size such as 64MiB, got '1XB'"),
    ("limits: {max_held_messages: 0}\n",
     "1: limits.max_held_messages: expected a whole number above 0, got 0"),
    ("stepup: {scope: global}\n", "1: stepup.scope: expected one of client, session, got 'global'"),
    ("stepup:\n  lockout:\n    failures: -1\n",
     "3: stepup.lockout.failures: expected a whole number above 0, got -1"),
    ("stepup: {default_ttl: forever}\n",
     "1: stepup.default_ttl: expected a duration such as 30s or 15m, got 'forever'"),
    ("auth: {allow_trust: yes please}\n",
     "1: auth.allow_trust: expected true or false, got 'yes please'"),
    ("admin: {public_url: pgguard.example.com}\n",
     "1: admin.public_url: expected an http:// or https:// URL, got 'pgguard.example.com'"),
    ("state: redis://x\n",
     "1: state: expected sqlite:///FILE, a file path or postgresql://…, got 'redis://x'"),
    ("tls: {mode: require}\n", "1: tls: mode require needs cert and key"),
    ("pii:\n  tables:\n    public.users: 7\n",
     "3: pii.tables.public.users: expected a list of column names or '*'"),
    ("listen: 1.2.3.4:6433\nlisten: 1.2.3.4:6434\n", "2: listen: duplicate key (first at line 1)"),
    ("debug: {refuse_pattern: '('}\n", "1: debug.refuse_pattern: bad regular expression: "
     "missing ), unterminated subpattern at position 0"),
])
def test_error_kinds(tmp_path: Path, text: str, expected: str) -> None:
    assert errors_of(tmp_path, text) == [expected]


@pytest.mark.parametrize(("text", "expected"), [
    ("roles: [a, b]\n",
     "1: roles: expected a mapping of role name to {users, allow, step_up}"),
    ("roles:\n  r: read\n", "2: roles.r: expected a mapping with users, allow and step_up"),
    ("roles:\n  r:\n    users: [a]\n", "2: roles.r: allow is required: a list of classes, or all"),
    ("roles:\n  r:\n    users: alice\n    allow: [read]\n",
     "3: roles.r.users: expected a list of user names or globs"),
    ("roles:\n  r:\n    users:\n      - alice\n      - ''\n    allow: [read]\n",
     "5: roles.r.users[1]: expected a user name or glob, got ''"),
    ("roles:\n  r:\n    allow:\n      - read\n      - reed\n",
     "5: roles.r.allow[1]: unknown class 'reed' "
     "(expected one of read, write, ddl, admin, pii, tx, unknown)"),
    ("roles:\n  r: {allow: everything}\n",
     "2: roles.r.allow: expected a list of classes or all, got 'everything'"),
    ("roles:\n  r:\n    allow: [read]\n    step_up: [pii]\n",
     "4: roles.r.step_up[0]: pii is not in allow"),
    ("roles:\n  r:\n    allow: [read, pii]\n    step_up:\n      pii: 10x\n",
     "5: roles.r.step_up.pii: expected a duration such as 30s or 15m, got '10x'"),
    ("roles:\n  r:\n    allow: [read]\n    step_up:\n      piii: 10m\n",
     "5: roles.r.step_up.piii: unknown class 'piii' "
     "(expected one of read, write, ddl, admin, pii, tx, unknown)"),
    ("roles:\n  r:\n    allow: [read]\n    step_up: pii\n",
     "4: roles.r.step_up: expected a list of classes or a mapping of class to ttl"),
    ("roles:\n  r:\n    allow: [read]\n    alow: [write]\n",
     "4: roles.r.alow: unknown key (did you mean allow?)"),
    ("roles:\n  r:\n    allow: [read]\n    when: never\n",
     "4: roles.r.when: unknown key (a role has users, allow, step_up)"),
    ("roles:\n  my.role: {allow: all}\n",
     "2: roles.my.role: a role name is letters, digits, _ and -, starting with a letter or _"),
    (ROLE_OK + "default_role: nobody\n", "3: default_role: 'nobody' names no role (roles: r)"),
    ("default_role: nobody\n", "1: default_role: 'nobody' names no role (there is no roles section)"),
])
def test_role_error_kinds(tmp_path: Path, text: str, expected: str) -> None:
    assert errors_of(tmp_path, text) == [expected]


def test_all_errors_at_once_in_file_order(tmp_path: Path) -> None:
    text = ("hold: {timeout: never}\n"                 # 1
            "roles:\n"                                 # 2
            "  a:\n"                                   # 3
            "    users: [x]\n"                         # 4
            "    allow: [read, nope]\n"                # 5
            "  b: {allow: [read], step_up: [ddl]}\n"   # 6
            "default_role: c\n"                        # 7
            "stepup: {scope: x}\n"                     # 8
            "bogus: 1\n")                              # 9
    errs = errors_of(tmp_path, text)
    assert [e.split(":", 1)[0] for e in errs] == ["1", "5", "6", "7", "8", "9"]
    assert errs[1].startswith("5: roles.a.allow[1]: unknown class 'nope'")
    assert errs[2] == "6: roles.b.step_up[0]: ddl is not in allow"
    assert errs[5] == "9: bogus: unknown key"


def test_error_lines_carry_the_file_name(tmp_path: Path) -> None:
    p = write(tmp_path, "hold: {timeout: x}\n", name="prod.yaml")
    with pytest.raises(ConfigError, match=rf"^{p}:1: hold.timeout: "):
        load_config(p)


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    p = write(tmp_path, "listen: 127.0.0.1:6433\nroles: {a: [\n")
    with pytest.raises(ConfigError, match=rf"^{p}:3: not valid YAML"):
        load_config(p)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=rf"^{p}:1: the top level must be a mapping"):
        load_config(p)


def test_ttl_zero_and_list_form_use_default_ttl(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "stepup: {default_ttl: 0s}\nroles:\n"
                                      "  r: {users: [a], allow: all, step_up: [pii, write]}\n"))
    assert dict(cfg.policy.roles[0].step_up) == {C.PII: 0.0, C.WRITE: 0.0}


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "listen: 127.0.0.1:7000\n"), {"listen": "0.0.0.0:7001",
                                                                    "upstream": None})
    assert cfg.listen == HostPort("0.0.0.0", 7001)


# -- reload -----------------------------------------------------------------------------------

def test_reload_good_file_returns_new_config_and_changed_keys(tmp_path: Path) -> None:
    p = write(tmp_path, ROLE_OK + "hold: {timeout: 60s}\n")
    current = load_config(p, {"listen": "127.0.0.1:7005"})
    p.write_text(ROLE_OK.replace("[read]", "[read, write]") + "hold: {timeout: 60s}\n")
    result = reload_config(current)
    assert result.ok and result.error is None and result.config is not None
    assert result.config.policy.roles[0].allow == {C.READ, C.WRITE}
    assert result.changed == ("roles",)
    assert result.config.listen == HostPort("127.0.0.1", 7005)  # flags re-applied


def test_reload_bad_file_reports_every_error_and_no_config(tmp_path: Path) -> None:
    p = write(tmp_path, ROLE_OK)
    current = load_config(p)
    p.write_text("roles:\n  r: {users: [a], allow: [reed]}\ndefault_role: zz\n")
    result = reload_config(current)
    assert not result.ok and result.config is None and result.error is not None
    lines = result.error.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{p}:2: roles.r.allow[0]: unknown class 'reed'")
    assert lines[1] == f"{p}:3: default_role: 'zz' names no role (roles: r)"


def test_reload_missing_file_and_flags_only(tmp_path: Path) -> None:
    p = write(tmp_path, ROLE_OK)
    current = load_config(p)
    p.unlink()
    result = reload_config(current)
    assert not result.ok and result.error is not None and "cannot read" in result.error
    assert not reload_config(Config()).ok
