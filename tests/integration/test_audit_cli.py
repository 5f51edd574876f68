"""`pgguard audit verify` and `pgguard audit tail` as a user runs them: subprocesses, exit codes,
output."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

from pgguard.observability import audit as A
from pgguard.observability.audit import AuditConfig, AuditSink, rotated_files


def pgguard(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgguard", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def make_trail(path: Path, n: int, **kw) -> None:
    s = AuditSink(AuditConfig(path=path, **kw))
    s.start()
    users = ["alice", "bob"]
    for i in range(n):
        s.emit(A.STATEMENT if i % 2 else A.SESSION_START, session=f"sess{i:08d}",
               user=users[i % 2], client_addr="10.0.0.7:5000", decision="allowed")
        if i % 4 == 3:
            assert s.flush_sync()
    assert s.flush_sync()
    s.close_sync()


def test_verify_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_trail(path, 8)
    out = pgguard("audit", "verify", path)
    assert (out.returncode, out.stdout) == (0, "ok 8 events\n")

    lines = path.read_text().splitlines(keepends=True)
    cases = {
        "edited": [*lines[:4], lines[4].replace('"allowed"', '"denied"'), *lines[5:]],
        "removed": [*lines[:4], *lines[5:]],
        "inserted": [*lines[:4], lines[1], *lines[4:]],
        "reordered": [*lines[:3], lines[4], lines[3], *lines[5:]],
    }
    expected_line = {"edited": 5, "removed": 5, "inserted": 5, "reordered": 4}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.jsonl"
        bad.write_text("".join(content))
        out = pgguard("audit", "verify", bad)
        assert out.returncode == 1, name
        assert out.stderr.startswith(f"{bad}:{expected_line[name]}: "), (name, out.stderr)
        assert out.stdout == ""
    out = pgguard("audit", "verify", tmp_path / "missing.jsonl")
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_verify_rotated_files_alone_and_as_a_series(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_trail(path, 24, rotate_bytes=900)
    series = [*rotated_files(path), path]
    assert len(series) >= 3
    out = pgguard("audit", "verify", *series)
    assert (out.returncode, out.stdout) == (0, "ok 24 events\n")
    alone = pgguard("audit", "verify", series[1])
    assert alone.returncode == 0 and alone.stdout.startswith("ok ")
    swapped = pgguard("audit", "verify", series[1], series[0], *series[2:])
    assert swapped.returncode == 1 and f"{series[0]}:1: prev does not match" in swapped.stderr


def test_tail_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_trail(path, 6)
    out = pgguard("audit", "tail", path)
    assert out.returncode == 0
    shown = out.stdout.splitlines()
    assert len(shown) == 6
    assert " #1 session.start alice@10.0.0.7:5000 session=sess00000000" in shown[0]
    assert "hash" not in out.stdout and "prev" not in out.stdout
    bob = pgguard("audit", "tail", "--user", "bob", path).stdout.splitlines()
    assert len(bob) == 3 and all(" bob@" in x for x in bob)
    stm = pgguard("audit", "tail", "--event", "statement", "-n", "2", path).stdout.splitlines()
    assert [x.split()[2] for x in stm] == ["#4", "#6"]
    assert all("decision=allowed" in x for x in stm)


def test_tail_follow_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_trail(path, 2)
    proc = subprocess.Popen([sys.executable, "-m", "pgguard", "audit", "tail", "--follow",
                             "--event", "stepup", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    got: list[str] = []

    def read_until(n: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        buf = b""
        while len(got) < n and time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                assert chunk, proc.stderr.read() if proc.stderr else ""
                buf += chunk
                *complete, buf_rest = buf.split(b"\n")
                got.extend(x.decode() for x in complete)
                buf = buf_rest
        assert len(got) >= n, got

    try:
        time.sleep(0.5)
        s = AuditSink(AuditConfig(path=path, rotate_bytes=600))
        s.start()
        try:
            s.emit(A.SESSION_START, session="abcdefghijkl", user="carol")
            s.emit(A.STEPUP_FAILURE, session="abcdefghijkl", user="carol", reason="bad_code")
            assert s.flush_sync()
            read_until(1)
            for i in range(6):  # enough to rotate the file under the follower
                s.emit(A.STEPUP_SUCCESS, session="abcdefghijkl", user="carol", n=i)
                assert s.flush_sync()
            assert rotated_files(path)
            read_until(7)
        finally:
            s.close_sync()
        assert "stepup.failure carol" in got[0] and "reason=bad_code" in got[0]
        assert [json.loads(x.rsplit("n=", 1)[1]) for x in got[1:7]] == list(range(6))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        print(proc.stderr.read().decode() if proc.stderr else "")
