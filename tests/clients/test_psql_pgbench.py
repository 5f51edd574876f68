"""psql 15 and pgbench 15 (libpq 15) scenarios of PROTOCOL.md §4, direct vs through pgguard.

psql runs scripts with `VERBOSITY sqlstate`, so errors print as `ERROR:  <SQLSTATE>`; what the
user sees (stdout, stderr, exit code) must be the same both ways once PIDs are masked and the
refused statement's SQLSTATE (P0001 direct, 42501 through pgguard) is mapped to one marker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.clients.conftest import (
    DIRECT_REFUSED_STATE,
    POLICY_STATE,
    REFUSED_SQL,
    Target,
    count_rows,
    need_tool,
    reset_table,
)

pytestmark = pytest.mark.timeout(180)


def env(t: Target, **more: str) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": t.password(), "PGSSLMODE": "disable",
            "PGCONNECT_TIMEOUT": "10", "PGHOST": t.host, "PGPORT": str(t.port),
            "PGUSER": "app", "PGDATABASE": "app", **more}


def psql(t: Target, script: str, *args: str, timeout: float = 120, **envs: str) -> dict:
    exe = need_tool("psql")
    out = subprocess.run([exe, "-X", "-q", "-A", "-t", "-v", "VERBOSITY=sqlstate", *args],
                         input=script, capture_output=True, text=True, timeout=timeout,
                         env=env(t, **envs))
    return {"rc": out.returncode, "out": out.stdout, "err": out.stderr}


def mask(result: dict, t: Target) -> dict:
    refused = POLICY_STATE if t.proxy is not None else DIRECT_REFUSED_STATE
    masked = {}
    for k, v in result.items():
        if isinstance(v, str):
            v = re.sub(r"PID \d+", "PID <pid>", v)
            v = v.replace(f"ERROR:  {refused}", "ERROR:  REFUSED")
        masked[k] = v
    return masked


def both(direct: Target, guarded: Target, script: str, *args: str,
         prepare: bool = False, **envs: str) -> tuple[dict, dict]:
    if prepare:
        reset_table(direct.pg)
    d = mask(psql(direct, script, *args, **envs), direct)
    if prepare:
        d["committed"] = count_rows(direct.pg)
        reset_table(guarded.pg)
    g = mask(psql(guarded, script, *args, **envs), guarded)
    if prepare:
        g["committed"] = count_rows(guarded.pg)
    assert g == d
    return d, g


def test_psql_scram_and_multi_statement(direct: Target, guarded: Target) -> None:
    script = ("SELECT current_user;\n"
              "SELECT 1 AS a \\; SELECT 2 AS b \\; CREATE TEMP TABLE tt (i int);\n"
              ";\n"  # an empty statement
              "SELECT 'done';\n")
    d, _ = both(direct, guarded, script)
    assert d == {"rc": 0, "out": "app\n1\n2\ndone\n", "err": ""}


def test_psql_policy_refusal_and_transactions(direct: Target, guarded: Target) -> None:
    script = ("\\echo simple\n"
              "INSERT INTO m VALUES (1, 'kept');\n"
              f"INSERT INTO m VALUES (2, 'lost') \\; {REFUSED_SQL};\n"
              "BEGIN;\n"
              "INSERT INTO m VALUES (3, 'lost');\n"
              f"{REFUSED_SQL};\n"
              "SELECT 1;\n"
              "COMMIT;\n"
              "\\echo :LAST_ERROR_SQLSTATE\n"
              "BEGIN;\n"
              "INSERT INTO m VALUES (4, 'lost');\n"
              "INSERT INTO m VALUES (1, 'dup');\n"
              "COMMIT;\n"
              "BEGIN;\n"
              "INSERT INTO m VALUES (5, 'rolled back');\n"
              "ROLLBACK;\n"
              "SELECT id FROM m ORDER BY id;\n")
    d, g = both(direct, guarded, script, "-v", "ON_ERROR_STOP=0", "-e", prepare=True)
    assert d["committed"] == 1 and d["out"].rstrip().endswith("\n1"), d
    assert g["err"].count("ERROR:  REFUSED") == 2 and "ERROR:  25P02" in g["err"]
    assert "ERROR:  23505" in g["err"]
    if guarded.proxy is not None:
        raw = psql(guarded, f"{REFUSED_SQL};\n", "-v", "VERBOSITY=default")
        assert "ERROR:  pgguard: statement rejected by policy" in raw["err"], raw


def test_psql_copy(direct: Target, guarded: Target, tmp_path: Path) -> None:
    src = tmp_path / "in.tsv"
    src.write_text("".join(f"{i}\tr{i}\n" for i in range(1, 201)))
    bad = tmp_path / "bad.tsv"
    bad.write_text("1000\tok\nnotanint\tbad\n")
    script = (f"\\copy m (id, v) FROM '{src}'\n"
              "\\copy (SELECT id, v FROM m ORDER BY id) TO STDOUT\n"
              f"\\copy m (id, v) FROM '{bad}'\n"
              "SELECT count(*) FROM m;\n")
    d, _ = both(direct, guarded, script, "-v", "ON_ERROR_STOP=0", prepare=True)
    assert d["out"].count("\n") == 201 and d["out"].endswith("\n200\n")
    assert "ERROR:  22P02" in d["err"] and d["committed"] == 200


def test_psql_notify(direct: Target, guarded: Target) -> None:
    other = (f"PGPASSWORD={direct.password()} psql -X -q -h 127.0.0.1 -p {direct.pg.port}"
             " -U app -d app -c \"NOTIFY matrix_chan, 'from another session'\"")
    script = ("LISTEN matrix_chan;\n"
              "NOTIFY matrix_chan, 'idle';\n"
              f"\\! {other}\n"
              "SELECT 1;\n"
              "BEGIN;\n"
              "NOTIFY matrix_chan, 'in tx';\n"
              "SELECT 2;\n"
              "COMMIT;\n")
    d, _ = both(direct, guarded, script)
    assert d["out"].count("Asynchronous notification") == 3, d


def test_psql_cancel_with_sigint(direct: Target, guarded: Target) -> None:
    def run(t: Target) -> dict:
        exe = need_tool("psql")
        p = subprocess.Popen([exe, "-X", "-q", "-v", "VERBOSITY=sqlstate",
                              "-c", "SELECT pg_sleep(20)"], env=env(t),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        start = time.monotonic()
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=15)
        return {"rc": p.returncode, "err": err, "fast": time.monotonic() - start < 8}

    d, g = run(direct), run(guarded)
    assert g == d
    assert d["rc"] == 1 and "ERROR:  57014" in d["err"] and d["fast"], d


def test_psql_upstream_fatal(direct: Target, guarded: Target) -> None:
    script = "SELECT 1;\nSELECT pg_terminate_backend(pg_backend_pid());\nSELECT 2;\n"
    d, _ = both(direct, guarded, script)
    assert d["rc"] == 2 and d["err"].count("FATAL") == 1 and "57P01" in d["err"], d


def test_psql_tls_channel_binding(guarded: Target) -> None:
    """libpq 15 over TLS to pgguard: prefer and disable work; require fails cleanly."""
    for cb in ("prefer", "disable"):
        r = psql(guarded, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();\n"
                 "SELECT 42;\n", PGSSLMODE="require", PGCHANNELBINDING=cb)
        assert r["rc"] == 0 and r["out"].endswith("42\n"), (cb, r)
    start = time.monotonic()
    r = psql(guarded, "SELECT 42;\n", PGSSLMODE="require", PGCHANNELBINDING="require",
             timeout=30)
    assert r["rc"] == 2 and "channel binding" in r["err"], r
    assert time.monotonic() - start < 8


def test_startup_refusals(guarded: Target) -> None:
    r = psql(guarded, "SELECT 1;\n", PGOPTIONS="-c role=postgres")
    assert r["rc"] == 2 and "pgguard: startup setting role is not allowed" in r["err"], r
    r = psql(guarded, "SELECT 1;\n", PGOPTIONS="-c application_name=matrix-ok")
    assert r["rc"] == 0, r
    exe = need_tool("psql")
    out = subprocess.run([exe, "-X", "-d", "dbname=app replication=database", "-c",
                          "IDENTIFY_SYSTEM"], env=env(guarded), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "pgguard: replication connections are not allowed" \
        in out.stderr, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("pg", ["pg18"], indirect=True)  # one server version bounds the runtime
def test_psql_large(direct: Target, guarded: Target, tmp_path: Path) -> None:
    big = tmp_path / "big.sql"
    big.write_text(f"SELECT length('{'x' * (20 * 1024 * 1024)}');\n"
                   "SELECT count(*), sum(g) FROM (SELECT g FROM generate_series(1, 1000000) g) s;\n")
    rows = "SELECT g, 'row ' || g FROM generate_series(1, 1000000) g;\n"

    def run(t: Target) -> dict:
        r = psql(t, "", "-f", str(big), timeout=200)
        exe = need_tool("psql")
        p = subprocess.run([exe, "-X", "-q", "-A", "-t", "-c", rows], env=env(t),
                           capture_output=True, timeout=200)
        return {**r, "rows_rc": p.returncode, "rows_lines": p.stdout.count(b"\n"),
                "rows_tail": p.stdout[-20:].decode()}

    d, g = run(direct), run(guarded)
    assert g == d
    assert d["out"] == "20971520\n1000000|500000500000\n" and d["rows_lines"] == 1000000


# -- pgbench -----------------------------------------------------------------------------------

def pgbench(t: Target, *args: str, timeout: float = 120) -> dict:
    exe = need_tool("pgbench")
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                         env=env(t))
    text = out.stdout + out.stderr
    facts = {"rc": out.returncode}
    for key in ("number of transactions actually processed", "number of failed transactions"):
        m = re.search(re.escape(key) + r": (\d+(?:/\d+)?)", text)
        facts[key] = m.group(1) if m else None
    facts["errors"] = [ln for ln in text.splitlines() if "error" in ln.lower()]
    return facts


def test_pgbench(direct: Target, guarded: Target, tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.sql"
    pipeline.write_text("\\set aid random(1, 100000)\n"
                        "\\startpipeline\n"
                        "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
                        "SELECT count(*) FROM pgbench_branches;\n"
                        "UPDATE pgbench_tellers SET tbalance = tbalance WHERE tid = 1;\n"
                        "\\endpipeline\n")
    runs = {
        "init": ["-i", "-s", "1", "-q"],
        "simple": ["-S", "-c", "2", "-t", "200", "-M", "simple"],
        "extended": ["-S", "-c", "2", "-t", "200", "-M", "extended"],
        "prepared": ["-S", "-c", "2", "-t", "200", "-M", "prepared"],
        "tpcb_prepared": ["-c", "2", "-t", "50", "-M", "prepared"],
        "pipeline": ["-f", str(pipeline), "-c", "2", "-t", "50", "-M", "prepared"],
    }
    results = {}
    for t in (direct, guarded):
        got = {}
        for name, args in runs.items():
            got[name] = pgbench(t, *args)
        got["accounts"] = t.pg.psql("SELECT count(*) FROM pgbench_accounts", dbname="app").strip()
        results[t.kind] = got
    assert results["guarded"] == results["direct"]
    d = results["direct"]
    assert d["init"]["rc"] == 0 and d["accounts"] == "100000"
    for name in ("simple", "extended", "prepared"):
        assert d[name]["rc"] == 0 and d[name]["number of transactions actually processed"] \
            == "400/400", (name, d[name])
    assert d["pipeline"]["number of transactions actually processed"] == "100/100"
