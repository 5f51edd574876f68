"""pgbench `-S` TPS through each target: direct, pgbouncer (session mode), pgguard.

For every protocol mode (`-M simple|extended|prepared`) and client count (1, 8, 32) the targets
run interleaved (direct, pgbouncer, pgguard, direct, ...) `BENCH_REPEATS` times, so a slow
moment of the shared machine hits all of them alike; the median TPS of each is reported with
the ratios pgguard/direct and pgguard/pgbouncer. The cell the speed target is set on
(`-M prepared`, 8 clients) runs `BENCH_KEY_SECONDS`, the others `BENCH_SECONDS`.

Run alone: `python -m benchmarks.pgbench_compare` (same environment variables as `make bench`).
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.targets import DBNAME, BenchSettings, BenchTargets, Target

__all__ = ["KEY_CELL", "PgbenchRun", "compare", "format_table", "initialize"]

KEY_CELL = ("prepared", 8)  # where "pgguard >= 0.8 x pgbouncer" is measured
_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without|excluding)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class PgbenchRun:
    target: str
    mode: str
    clients: int
    repeat: int
    seconds: int
    tps: float | None
    latency_ms: float | None
    error: str = ""
    transactions: int | None = None
    proxy_cpu_us_per_txn: float | None = None  # the proxy process's CPU time per transaction


def _pgbench() -> str:
    found = shutil.which("pgbench")
    if not found:
        raise SystemExit("pgbench is not on PATH (Debian: apt-get install postgresql-client)")
    return found


def initialize(targets: BenchTargets, scale: int) -> None:
    """`pgbench -i` directly on the server, as the benchmark's own role into database app."""
    direct = targets.by_name("direct")
    assert direct is not None
    out = subprocess.run([_pgbench(), "-i", "-q", "-s", str(scale), DBNAME],
                         env=direct.libpq_env(), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {out.stderr.strip()[-1000:]}")


def run_pgbench(target: Target, mode: str, clients: int, seconds: int, repeat: int) -> PgbenchRun:
    # One pgbench thread per core at most: more threads than cores only add switching, and
    # pgbench shares the two cores with the server and the proxy under test.
    jobs = max(1, min(clients, 2))
    argv = [_pgbench(), "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(jobs),
            "-T", str(seconds), DBNAME]
    cpu_before = target.cpu_seconds()
    try:
        out = subprocess.run(argv, env=target.libpq_env(), capture_output=True, text=True,
                             timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        return PgbenchRun(target.name, mode, clients, repeat, seconds, None, None, "timed out")
    cpu_after = target.cpu_seconds()
    tps, latency = _TPS.search(out.stdout), _LATENCY.search(out.stdout)
    processed = _PROCESSED.search(out.stdout)
    if out.returncode != 0 or tps is None:
        error = (out.stderr.strip() or out.stdout.strip())[-300:] or f"exit {out.returncode}"
        return PgbenchRun(target.name, mode, clients, repeat, seconds, None, None, error)
    txns = int(processed.group(1)) if processed else None
    # CPU per transaction hardly depends on what else the machine runs, unlike TPS: the
    # number to watch when comparing two commits of pgguard on a busy machine. It includes
    # the connection set-up of the run (SCRAM relay), small against a run's transactions.
    cpu = (None if cpu_before is None or cpu_after is None or not txns
           else (cpu_after - cpu_before) / txns * 1e6)
    return PgbenchRun(target.name, mode, clients, repeat, seconds, float(tps.group(1)),
                      float(latency.group(1)) if latency else None, "", txns, cpu)


def compare(targets: BenchTargets, settings: BenchSettings,
            progress: bool = True) -> dict[str, Any]:
    """Runs the whole matrix; returns the runs and, per cell, median TPS and ratios."""
    runs: list[PgbenchRun] = []
    cells: list[dict[str, Any]] = []
    # A short unmeasured run first, so the first measured one does not pay for cold caches.
    run_pgbench(targets.targets[0], "prepared", 2, 2, -1)
    for mode in settings.modes:
        for clients in settings.clients:
            seconds = settings.key_seconds if (mode, clients) == KEY_CELL else settings.seconds
            cell_runs: list[PgbenchRun] = []
            for repeat in range(settings.repeats):
                for target in targets.targets:
                    run = run_pgbench(target, mode, clients, seconds, repeat)
                    cell_runs.append(run)
                    if progress:
                        shown = f"{run.tps:10.0f} tps" if run.tps is not None else f"ERROR {run.error}"
                        print(f"  -M {mode:<8} -c {clients:<3} #{repeat + 1} {target.name:<9} {shown}",
                              file=sys.stderr, flush=True)
            runs += cell_runs
            cells.append(_summarize(mode, clients, seconds, cell_runs, targets))
    return {"runs": [asdict(r) for r in runs], "cells": cells}


def _summarize(mode: str, clients: int, seconds: int, runs: list[PgbenchRun],
               targets: BenchTargets) -> dict[str, Any]:
    median: dict[str, float | None] = {}
    latency: dict[str, float | None] = {}
    cpu: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for target in targets.targets:
        mine = [r for r in runs if r.target == target.name]
        tps = [r.tps for r in mine if r.tps is not None]
        lat = [r.latency_ms for r in mine if r.latency_ms is not None]
        # A target with any failed run gets no number: a median of the survivors would flatter it.
        failed = [r.error for r in mine if r.tps is None]
        median[target.name] = statistics.median(tps) if tps and not failed else None
        latency[target.name] = statistics.median(lat) if lat and not failed else None
        used = [r.proxy_cpu_us_per_txn for r in mine if r.proxy_cpu_us_per_txn is not None]
        if target.pid is not None:
            cpu[target.name] = statistics.median(used) if used and not failed else None
        if failed:
            errors[target.name] = failed[0]
    return {"mode": mode, "clients": clients, "seconds": seconds, "tps": median,
            "latency_ms": latency, "proxy_cpu_us_per_txn": cpu, "ratios": _ratios(median),
            "pgguard_pgbouncer_by_repeat": _by_repeat(runs),
            "errors": errors}


def _by_repeat(runs: list[PgbenchRun]) -> list[float | None]:
    """pgguard/pgbouncer of each repeat alone (its two runs were next to each other): how far
    the machine moved the ratio between repeats. The verdict is on the medians."""
    tps = {(r.target, r.repeat): r.tps for r in runs}
    out: list[float | None] = []
    for repeat in sorted({r.repeat for r in runs}):
        a, b = tps.get(("pgguard", repeat)), tps.get(("pgbouncer", repeat))
        out.append(None if a is None or not b else round(a / b, 3))
    return out


def _ratios(median: dict[str, float | None]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        x, y = median.get(a), median.get(b)
        return x / y if x is not None and y else None

    out = {"pgguard/direct": ratio("pgguard", "direct"),
           "pgguard/pgbouncer": ratio("pgguard", "pgbouncer"),
           "pgbouncer/direct": ratio("pgbouncer", "direct")}
    if "relay" in median:
        out["relay/pgbouncer"] = ratio("relay", "pgbouncer")
        out["pgguard/relay"] = ratio("pgguard", "relay")
    return out


def format_table(result: dict[str, Any], names: list[str], repeats: int) -> str:
    ratio_names = ["pgguard/direct", "pgguard/pgbouncer", "pgbouncer/direct"]
    if "relay" in names:
        ratio_names += ["relay/pgbouncer", "pgguard/relay"]
    head = f"{'mode':<9}{'clients':>8}" + "".join(f"{n:>11}" for n in names) + "".join(
        f"{n:>19}" for n in ratio_names)
    lines = [f"pgbench -S: median TPS of {repeats} interleaved runs per target", head,
             "-" * len(head)]
    for cell in result["cells"]:
        row = f"{cell['mode']:<9}{cell['clients']:>8}"
        row += "".join(f"{_num(cell['tps'].get(n), '.0f'):>11}" for n in names)
        row += "".join(f"{_num(cell['ratios'].get(r), '.3f'):>19}" for r in ratio_names)
        lines.append(row)
    for cell in result["cells"]:
        spread = cell.get("pgguard_pgbouncer_by_repeat") or []
        if (cell["mode"], cell["clients"]) == KEY_CELL and any(x is not None for x in spread):
            lines.append(f"  -M {cell['mode']} -c {cell['clients']}, pgguard/pgbouncer of each "
                         f"repeat ({cell['seconds']} s runs): "
                         + " ".join(_num(x, '.3f') for x in spread))
    proxies = [n for n in names if n != "direct"]
    if proxies:
        lines += ["", "proxy process CPU time per transaction, µs (median runs; load-independent)",
                  f"{'mode':<9}{'clients':>8}" + "".join(f"{n:>11}" for n in proxies)]
        for cell in result["cells"]:
            lines.append(f"{cell['mode']:<9}{cell['clients']:>8}" + "".join(
                f"{_num(cell['proxy_cpu_us_per_txn'].get(n), '.1f'):>11}" for n in proxies))
    ones = [c for c in result["cells"] if c["clients"] == 1]
    if ones and len(names) > 1:
        lines += ["", "pgbench -S, 1 client: average latency added over direct, µs (median runs)",
                  f"{'mode':<9}" + "".join(f"{n:>11}" for n in names[1:])]
        for cell in ones:
            base = cell["latency_ms"].get("direct")
            row = f"{cell['mode']:<9}"
            for n in names[1:]:
                ms = cell["latency_ms"].get(n)
                added = None if ms is None or base is None else (ms - base) * 1000
                row += f"{_num(added, '+.1f'):>11}"
            lines.append(row)
    for cell in result["cells"]:
        for name, error in cell["errors"].items():
            lines.append(f"  ! -M {cell['mode']} -c {cell['clients']} {name}: {error}")
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def main() -> None:
    settings = BenchSettings.from_env()
    with BenchTargets(settings) as targets:
        initialize(targets, settings.scale)
        result = compare(targets, settings)
        print(format_table(result, [t.name for t in targets.targets], settings.repeats))


if __name__ == "__main__":
    main()
