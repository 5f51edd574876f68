"""asyncpg round-trip latency of `SELECT 1` through each target, one connection each.

Each target gets one connection, a warm-up, then `BENCH_LATENCY_N` sequential `fetchval('SELECT
1')` calls (Bind/Execute/Sync of a prepared statement, asyncpg's normal path) timed one by one.
The calls run in rounds that alternate the targets, so noise from the shared machine falls on all
of them alike. Reported: p50, p99 and mean in µs, what each proxy adds over direct at p50, and
the proxy process's CPU time per round trip.

asyncpg's statement cache stays on: pgbouncer in session mode keeps the server connection for
the client's whole session, so named prepared statements work through it as they do direct.

Run alone: `python -m benchmarks.latency`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import asyncpg

from benchmarks.targets import DBNAME, PASSWORD, USER, BenchSettings, BenchTargets, Target

__all__ = ["ROUNDS", "format_table", "measure", "run"]

ROUNDS = 10      # the timed calls of each target are split into this many alternating rounds
WARMUP = 2000    # untimed calls per target first (statement cache, CPU caches, TCP windows)


async def _connect(target: Target) -> asyncpg.Connection:
    return await asyncio.wait_for(asyncpg.connect(
        host=target.host, port=target.port, user=USER, password=PASSWORD, database=DBNAME,
        ssl=False), timeout=15)


async def _timed(conn: asyncpg.Connection, n: int, samples: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        await conn.fetchval("SELECT 1")
        samples.append(clock() - start)


async def measure(targets: list[Target], queries: int) -> dict[str, dict[str, Any]]:
    conns: dict[str, asyncpg.Connection] = {}
    samples: dict[str, list[int]] = {t.name: [] for t in targets}
    cpu: dict[str, float] = {t.name: 0.0 for t in targets}  # proxy CPU seconds while timed
    by_name = {t.name: t for t in targets}
    errors: dict[str, str] = {}
    try:
        for target in targets:
            try:
                conns[target.name] = await _connect(target)
                await asyncio.wait_for(_timed(conns[target.name], WARMUP, []), timeout=60)
            except Exception as exc:
                errors[target.name] = f"{type(exc).__name__}: {exc}"
        per_round = max(1, queries // ROUNDS)
        for _ in range(ROUNDS):
            for name, conn in conns.items():
                if name in errors:
                    continue
                before = by_name[name].cpu_seconds()
                try:
                    await asyncio.wait_for(_timed(conn, per_round, samples[name]), timeout=120)
                    after = by_name[name].cpu_seconds()
                    if before is not None and after is not None:
                        cpu[name] += after - before
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
    finally:
        for conn in conns.values():
            conn.terminate()
    result: dict[str, dict[str, Any]] = {}
    for t in targets:
        if t.name in errors:
            result[t.name] = {"error": errors[t.name]}
            continue
        result[t.name] = _stats(samples[t.name])
        if t.pid is not None and samples[t.name]:
            result[t.name]["proxy_cpu_us"] = cpu[t.name] / len(samples[t.name]) * 1e6
    return result


def _stats(ns: list[int]) -> dict[str, Any]:
    ns = sorted(ns)

    def pct(p: float) -> float:
        return ns[min(len(ns) - 1, int(p * len(ns)))] / 1000

    return {"n": len(ns), "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99),
            "mean_us": statistics.fmean(ns) / 1000}


def run(targets: list[Target], queries: int) -> dict[str, Any]:
    """Measure on a fresh event loop (uvloop when installed, as pgguard itself runs)."""
    try:
        import uvloop
    except ImportError:
        loop_name, result = "asyncio", asyncio.run(measure(targets, queries))
    else:
        loop_name, result = "uvloop", uvloop.run(measure(targets, queries))
    direct = result.get("direct", {}).get("p50_us")
    for stats in result.values():
        if direct is not None and "p50_us" in stats:
            stats["added_p50_us"] = stats["p50_us"] - direct
    return {"client_loop": loop_name, "queries": queries, "targets": result}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"asyncpg SELECT 1 round trips, one connection, {result['queries']} per target "
             f"(client loop: {result['client_loop']}), µs",
             f"{'target':<11}{'p50':>9}{'p99':>9}{'mean':>9}{'added p50':>11}{'proxy CPU':>11}",
             "-" * 60]
    for name, s in result["targets"].items():
        if "error" in s:
            lines.append(f"{name:<11}  ERROR {s['error']}")
            continue
        added = s.get("added_p50_us")
        lines.append(f"{name:<11}{s['p50_us']:>9.1f}{s['p99_us']:>9.1f}{s['mean_us']:>9.1f}"
                     f"{'' if added is None else format(added, '+.1f'):>11}"
                     f"{format(s['proxy_cpu_us'], '.1f') if 'proxy_cpu_us' in s else '':>11}")
    return "\n".join(lines)


def main() -> None:
    settings = BenchSettings.from_env()
    with BenchTargets(settings) as targets:
        print(format_table(run(targets.targets, settings.latency_queries)))


if __name__ == "__main__":
    main()
