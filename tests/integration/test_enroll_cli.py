"""`pgguard enroll` as a user runs it (DESIGN §6, §8): a real subprocess with a temporary config,
checking stdout, stderr, exit codes and what a later verification sees."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "conf" / "pgguard.yaml"
    cfg.parent.mkdir()
    cfg.write_text("upstream: 127.0.0.1:5432\n"
                   "state: sqlite:///var/state.db\n"
                   "secrets: {key_file: keys/pgguard.key}\n")
    return cfg


def enroll(*args: str, config: Path | None = None, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(PYTHON if PYTHON.exists() else sys.executable), "-m", "pgguard", "enroll", *args]
    if config is not None:
        argv += ["--config", str(config)]
    e = {k: v for k, v in os.environ.items()
         if k not in ("PGGUARD_SECRET_KEY", "PGGUARD_CONFIG")}
    e.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=e,
                          cwd=cwd or ROOT)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("pgguard: ") and "Traceback" not in p.stderr
    return lines[0]


def test_enroll_prints_uri_and_qr_and_creates_files(config: Path) -> None:
    p = enroll("alice", config=config)
    assert p.returncode == 0, p.stderr
    uris = [w for w in p.stdout.split() if w.startswith("otpauth://")]
    assert len(uris) == 1
    parts = urlsplit(uris[0])
    assert parts.netloc == "totp" and parts.path == "/pgguard:alice"
    q = parse_qs(parts.query)
    assert q["issuer"] == ["pgguard"] and q["digits"] == ["6"] and q["period"] == ["30"]
    assert q["algorithm"] == ["SHA1"]
    assert q["secret"][0] in p.stdout.replace(uris[0], "")  # also shown for manual entry
    # The QR code: a square block of half-block characters, one line per two module rows.
    qr_lines = [ln for ln in p.stdout.splitlines() if ln and set(ln) <= set(" \u2580\u2584\u2588")]
    assert len(qr_lines) >= 15
    assert len({len(ln) for ln in qr_lines}) == 1
    assert abs(len(qr_lines[0]) - 2 * len(qr_lines)) <= 2  # square: width = module rows
    assert "\x1b[" not in p.stdout  # not a terminal: no colour codes
    # Files: relative to the config file's folder, 0600.
    state = config.parent / "var" / "state.db"
    key = config.parent / "keys" / "pgguard.key"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert q["secret"][0].encode() not in state.read_bytes()


def test_qr_decodes_to_the_uri_it_prints(config: Path) -> None:
    """The drawn code is the otpauth URI: rebuild the module matrix from the half blocks and
    compare it with the QR encoder's own matrix for the printed URI."""
    import qrcode

    p = enroll("alice", config=config)
    uri = next(w for w in p.stdout.split() if w.startswith("otpauth://"))
    qr_lines = [ln for ln in p.stdout.splitlines() if ln and set(ln) <= set(" \u2580\u2584\u2588")]
    top = {" ": 0, "\u2580": 1, "\u2584": 0, "\u2588": 1}
    bottom = {" ": 0, "\u2580": 0, "\u2584": 1, "\u2588": 1}
    drawn: list[list[int]] = []
    for ln in qr_lines:
        drawn.append([top[c] for c in ln])
        drawn.append([bottom[c] for c in ln])
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=4)
    qr.add_data(uri)
    qr.make(fit=True)
    expected = [[int(b) for b in row] for row in qr.get_matrix()]
    assert drawn[:len(expected)] == expected


def test_json_and_the_secret_verifies(config: Path) -> None:
    p = enroll("bob", "--json", config=config)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert set(doc) == {"user", "secret", "uri"} and doc["user"] == "bob"
    assert pyotp.parse_uri(doc["uri"]).secret == doc["secret"]

    # What the proxy will see: the stored secret decrypts with the same key file and matches.
    import asyncio

    from pgguard.state.factory import open_state_store
    from pgguard.stepup.service import AttemptResult, StepUpVerifier

    async def check() -> AttemptResult:
        store = await open_state_store("sqlite:///var/state.db", base_dir=config.parent,
                                       key_file="keys/pgguard.key", env={})
        try:
            import time
            now = time.time()
            code = pyotp.TOTP(doc["secret"]).at(now)
            return (await StepUpVerifier(store).attempt("bob", "127.0.0.1", code, now)).result
        finally:
            await store.close()
    assert asyncio.run(asyncio.wait_for(check(), 30)) is AttemptResult.SUCCESS


def test_reenroll_needs_force(config: Path) -> None:
    first = json.loads(enroll("alice", "--json", config=config).stdout)
    again = enroll("alice", config=config)
    assert again.returncode == 2
    assert "already enrolled" in one_line_error(again) and "--force" in again.stderr
    assert again.stdout == ""
    forced = enroll("alice", "--force", "--json", config=config)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["secret"] != first["secret"]


def test_revoke_and_list(config: Path) -> None:
    assert enroll("alice", "--json", config=config).returncode == 0
    assert enroll("bob", "--json", config=config).returncode == 0
    listed = enroll("--list", config=config)
    assert listed.returncode == 0
    rows = [ln.split() for ln in listed.stdout.splitlines()]
    assert [r[0] for r in rows] == ["alice", "bob"]
    assert all(len(r) == 2 and r[1].endswith("Z") and "T" in r[1] for r in rows)
    as_json = json.loads(enroll("--list", "--json", config=config).stdout)
    assert [r["user"] for r in as_json] == ["alice", "bob"]

    revoked = enroll("alice", "--revoke", config=config)
    assert revoked.returncode == 0 and "alice" in revoked.stdout
    assert [r["user"] for r in json.loads(enroll("--list", "--json", config=config).stdout)] \
        == ["bob"]
    again = enroll("alice", "--revoke", config=config)
    assert again.returncode == 1 and "not enrolled" in one_line_error(again)
    # After a revoke, enrolling again needs no --force.
    assert enroll("alice", config=config).returncode == 0


def test_list_empty(config: Path) -> None:
    p = enroll("--list", config=config)
    assert p.returncode == 0 and p.stdout == ""
    assert json.loads(enroll("--list", "--json", config=config).stdout) == []


@pytest.mark.parametrize("args", [[], ["alice", "--list"], ["alice", "--revoke", "--force"],
                                  ["x" * 64]])
def test_usage_errors_exit_2(config: Path, args: list[str]) -> None:
    p = enroll(*args, config=config)
    assert p.returncode == 2
    one_line_error(p)


def test_missing_config_exit_2(tmp_path: Path) -> None:
    p = enroll("alice", config=tmp_path / "nope.yaml")
    assert p.returncode == 2 and "nope.yaml" in one_line_error(p)
    p = enroll("alice", cwd=tmp_path)  # no --config, no PGGUARD_CONFIG, no ./pgguard.yaml
    assert p.returncode == 2 and "no config file" in one_line_error(p)


def test_postgresql_state_not_yet_supported_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "pgguard.yaml"
    cfg.write_text("state: postgresql://pgguard@db/state\n")
    p = enroll("alice", config=cfg)
    assert p.returncode == 2 and "not yet supported" in one_line_error(p)


def test_config_from_env_and_default_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "pgguard.yaml"
    cfg.write_text("upstream: 127.0.0.1:5432\n")
    p = enroll("alice", "--json", env={"PGGUARD_CONFIG": str(cfg)})
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "state.db").is_file() and (tmp_path / "pgguard.key").is_file()


def test_secret_key_from_env_and_wrong_key(config: Path) -> None:
    env = {"PGGUARD_SECRET_KEY": "A" * 44}
    assert enroll("alice", "--json", config=config, env=env).returncode == 0
    assert not (config.parent / "keys" / "pgguard.key").exists()  # the env key was used
    wrong = enroll("--list", config=config, env={"PGGUARD_SECRET_KEY": "B" * 44})
    assert wrong.returncode == 1
    assert "different key" in one_line_error(wrong)
    assert enroll("--list", config=config, env=env).returncode == 0


def test_unwritable_state_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    cfg = tmp_path / "pgguard.yaml"
    cfg.write_text("state: blocker/state.db\n")
    p = enroll("alice", config=cfg)
    assert p.returncode == 1 and "blocker" in one_line_error(p)
