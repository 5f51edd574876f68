"""`make bench`: the proxy benchmarks, then the classifier's when it is present.

Starts PostgreSQL, pgbouncer and pgguard (benchmarks.targets), runs the pgbench comparison and
the asyncpg latency test, prints both tables and the speed targets of issue 2, and writes
everything as JSON to benchmarks/results/ (gitignored) for later comparison.
Environment variables (BENCH_SECONDS, BENCH_REPEATS, ...): benchmarks/README.md.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import latency, pgbench_compare
from benchmarks.targets import REPO_ROOT, BenchSettings, BenchTargets

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIN_TPS_RATIO = 0.8       # pgguard ≥ 0.8 x pgbouncer TPS at -M prepared, 8 clients
MAX_EXTRA_LATENCY_US = 15.0  # pgguard's added p50 ≤ pgbouncer's added p50 + 15 µs


def speed_targets(tps: dict[str, Any], lat: dict[str, Any],
                  skipped: dict[str, str]) -> list[dict[str, Any]]:
    """The two targets of issue 2 with their verdicts: pass, FAIL or pending (not measurable)."""
    mode, clients = pgbench_compare.KEY_CELL
    cell = next((c for c in tps["cells"] if (c["mode"], c["clients"]) == (mode, clients)), None)
    ratio = cell["ratios"].get("pgguard/pgbouncer") if cell else None
    lat_t = lat["targets"]
    ours = lat_t.get("pgguard", {}).get("added_p50_us")
    theirs = lat_t.get("pgbouncer", {}).get("added_p50_us")
    why = "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in skipped.items() if k != "relay")
    return [
        {"name": f"TPS -S -M {mode} -c {clients}: pgguard/pgbouncer >= {MIN_TPS_RATIO}",
         "value": ratio, "limit": MIN_TPS_RATIO,
         "verdict": _verdict(ratio, ratio is not None and ratio >= MIN_TPS_RATIO, why)},
        {"name": f"p50 added over direct: pgguard <= pgbouncer + {MAX_EXTRA_LATENCY_US:g} µs",
         "value": None if ours is None or theirs is None else ours - theirs,
         "limit": MAX_EXTRA_LATENCY_US,
         "verdict": _verdict(ours if theirs is not None else None,
                             ours is not None and theirs is not None
                             and ours <= theirs + MAX_EXTRA_LATENCY_US, why)},
    ]


def _verdict(value: float | None, ok: bool, why: str) -> str:
    if value is None:
        return "pending" + (f" ({why})" if why else "")
    return "pass" if ok else "FAIL"


def _machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": [round(x, 2) for x in load]}


def _pgbench_version() -> str:
    out = subprocess.run(["pgbench", "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def run_proxy_benchmarks(settings: BenchSettings) -> dict[str, Any]:
    started = time.monotonic()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": {k: getattr(settings, k) for k in settings.__slots__},
    }
    print(f"pgguard benchmarks: {settings.repeats} repeats, {settings.seconds} s runs "
          f"({settings.key_seconds} s for -M prepared -c 8); load average at start "
          f"{report['machine']['loadavg_at_start']}", flush=True)
    with BenchTargets(settings) as targets:
        names = [t.name for t in targets.targets]
        print(f"targets: {', '.join(names)}" + "".join(
            f"; {k} left out" for k in targets.skipped), flush=True)
        pgbench_compare.initialize(targets, settings.scale)
        lat = latency.run(targets.targets, settings.latency_queries)
        tps = pgbench_compare.compare(targets, settings)
        report["versions"] = {**targets.versions, "pgbench": _pgbench_version()}
        report["skipped"] = targets.skipped
        report["pgguard_audit_events"] = targets.audit_events()
        for name in ("pgguard", "relay"):
            if name in names:
                report.setdefault("proxy_log_tail", {})[name] = targets.log_tail(name)[-1000:]
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.update(pgbench=tps, latency=lat,
                  targets=speed_targets(tps, lat, report["skipped"]),
                  elapsed_seconds=round(time.monotonic() - started, 1))
    print()
    if "pgguard" in names:
        audit = report["pgguard_audit_events"]
        print(f"pgguard: {report['versions'].get('pgguard_config')}"
              + ("" if audit is None else f"; {audit} audit events written"))
    print(pgbench_compare.format_table(tps, names, settings.repeats))
    print()
    print(latency.format_table(lat))
    print()
    print("speed targets (issue 2):")
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {t['verdict']:<8} {t['name']}  (measured: {value})")
    for name, why in report["skipped"].items():
        print(f"  note: {name} was not measured: {why.splitlines()[0]}")
    machine = report["machine"]
    print(f"  note: load average {machine['loadavg_at_start'][0]} at start, "
          f"{machine['loadavg_at_end'][0]} at end (ours included), on {machine['cpus']} CPUs"
          + ("; above 1 per CPU at start, the machine was busy with other work: noisy numbers"
             if machine["loadavg_at_start"][0] > (machine["cpus"] or 1) else ""))
    if settings.profile:
        print(f"  note: pgguard ran under cProfile (stats in {settings.profile}): "
              "its numbers are not measurements")
    return report


def save(report: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"proxy-{stamp}.json"
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return path


def run_classify_bench() -> None:
    try:
        module = importlib.import_module("benchmarks.classify_bench")
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks.classify_bench":
            raise
        print("\n(classifier benchmark not present yet: benchmarks/classify_bench.py)")
        return
    print("\n== classifier benchmark ==", flush=True)
    module.main()


def main() -> int:
    os.chdir(REPO_ROOT)
    settings = BenchSettings.from_env()
    report = run_proxy_benchmarks(settings)
    path = save(report)
    print(f"\nresults written to {path.relative_to(REPO_ROOT)} "
          f"({report['elapsed_seconds']:.0f} s)", flush=True)
    run_classify_bench()
    failed = any(t["verdict"] == "FAIL" for t in report["targets"])
    return 1 if failed and settings.strict else 0


if __name__ == "__main__":
    sys.exit(main())
