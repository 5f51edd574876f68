"""Classifier speed (issue 3): cold classification of short / medium / 5 KB statements against a
bare `sqlglot.parse`, cache hits in µs, and how long a cold parse of a large statement holds the
event loop (and what a process pool costs instead).

    .venv/bin/python -m benchmarks.classify_bench [--quick]

Times are CPU time of the measuring thread (`time.thread_time`), median of several repeats;
the loop-stall and process-pool figures are wall times (`time.perf_counter`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlglot
import yaml

from pgguard.classify import CatalogSnapshot, ClassificationCache, PiiRules, classify

ROOT = Path(__file__).resolve().parent.parent
CORPUS: dict[str, Any] = yaml.safe_load((ROOT / "tests" / "corpus" / "classify.yaml").read_text())

SHORT = "SELECT id, name FROM users WHERE id = $1 AND status = 'x'"

MEDIUM = """WITH recent AS (
  SELECT o.id, o.user_id, o.total, o.created_at
  FROM orders o
  WHERE o.created_at > now() - interval '30 days' AND o.status IN ('new', 'paid')
), per_user AS (
  SELECT r.user_id, count(*) AS n, sum(r.total) AS total
  FROM recent r
  GROUP BY r.user_id
  HAVING sum(r.total) > 100
)
SELECT u.id, u.name, p.n, p.total, c.brand, i.amount
FROM per_user p
JOIN users u ON u.id = p.user_id
LEFT JOIN billing.cards c ON c.user_id = u.id
LEFT JOIN billing.invoices i ON i.user_id = u.id AND i.issued_at > now() - interval '7 days'
WHERE u.created_at < now() AND coalesce(c.brand, 'none') <> 'test'
ORDER BY p.total DESC, u.id
LIMIT 50"""


def _long() -> str:
    ctes = []
    for i in range(9):
        ctes.append(
            f"c{i} AS (SELECT o.id, o.user_id, o.total * {i + 1} AS t{i}, o.status, "
            f"o.created_at, p.name AS product_{i}, p.price FROM orders o JOIN products p ON "
            f"p.id = o.id + {i} LEFT JOIN billing.invoices inv ON inv.user_id = o.user_id AND "
            f"inv.amount > {i * 10} WHERE o.status IN ('new', 'paid', 'shipped') AND o.total "
            f"BETWEEN {i} AND {i * 1000 + 5} AND o.created_at > now() - interval '{i + 1} days' "
            f"AND (o.data ->> 'tag{i}') IS NOT NULL)")
    body = ",\n".join(ctes)
    selects = " UNION ALL ".join(
        f"SELECT c{i}.id, c{i}.user_id, c{i}.t{i} AS t, c{i}.product_{i} AS product FROM c{i} "
        f"JOIN users u{i} ON u{i}.id = c{i}.user_id WHERE u{i}.name LIKE 'a%{i}'"
        for i in range(9))
    return f"WITH {body}\nSELECT x.id, x.user_id, sum(x.t) FROM ({selects}) x " \
           "GROUP BY x.id, x.user_id ORDER BY 3 DESC LIMIT 100"


LONG = _long()


def median_time(fn: Callable[[], object], number: int, repeat: int,
                clock: Callable[[], float] = time.thread_time) -> float:
    """Median seconds per call. CPU time of this thread by default: the box is shared, and
    other processes' load must not count as ours."""
    runs = []
    for _ in range(repeat):
        t0 = clock()
        for _ in range(number):
            fn()
        runs.append((clock() - t0) / number)
    return statistics.median(runs)


def _worker_init(pii: dict[str, Any], catalog: dict[str, Any]) -> None:
    global _W_RULES, _W_CAT  # per worker process (benchmark only)
    _W_RULES = PiiRules.from_config(pii)
    _W_CAT = CatalogSnapshot.from_mapping(catalog)


_W_RULES: PiiRules | None = None
_W_CAT: CatalogSnapshot | None = None


def _worker_classify(sql: str) -> Any:
    assert _W_RULES is not None
    return classify(sql, _W_RULES, _W_CAT)


async def _loop_stall(sql: str, rules: PiiRules, cat: CatalogSnapshot) -> tuple[float, float]:
    """Longest gap a 1 ms ticker sees while one cold classification runs on the loop."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    gaps.clear()
    t0 = time.perf_counter()
    classify(sql, rules, cat)
    spent = time.perf_counter() - t0
    await asyncio.sleep(0.01)
    stop.set()
    await task
    return spent, max(gaps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args(argv)
    repeat = 3 if args.quick else 7
    rules = PiiRules.from_config(CORPUS["pii"])
    cat = CatalogSnapshot.from_mapping(CORPUS["catalog"])
    classify("SELECT 1", rules, cat)  # warm the built-in list and the PII model

    compiled = sqlglot.parser.__file__.endswith(".so")
    print(f"sqlglot {sqlglot.__version__} ({'sqlglotc compiled' if compiled else 'pure Python'}), "
          f"Python {sys.version.split()[0]}")
    print()
    print(f"{'statement':<10} {'chars':>6} {'tokenize µs':>12} {'sqlglot.parse µs':>17} "
          f"{'classify µs':>12} {'ratio':>6}")
    for label, sql, number in (("short", SHORT, 300), ("medium", MEDIUM, 60),
                               ("5 KB", LONG, 8)):
        tok = median_time(lambda s=sql: sqlglot.tokenize(s, read="postgres"), number, repeat)
        parse = median_time(lambda s=sql: sqlglot.parse(s, read="postgres"), number, repeat)
        cold = median_time(lambda s=sql: classify(s, rules, cat), number, repeat)
        print(f"{label:<10} {len(sql):>6} {tok * 1e6:>12.0f} {parse * 1e6:>17.0f} "
              f"{cold * 1e6:>12.0f} {cold / parse:>6.2f}")

    print()
    print(f"{'cache hit':<34} {'µs':>6}")
    cache = ClassificationCache(rules, cat)
    for label, sql in (("short", SHORT), ("medium", MEDIUM), ("5 KB", LONG)):
        cache.classify(sql)
        same = median_time(lambda s=sql: cache.classify(s), 100_000, repeat)
        print(f"{label + ', same str object':<34} {same * 1e6:>6.2f}")
        # A new str per message (as decoded from the wire): its hash is computed once per lookup.
        fresh = [sql.encode().decode() for _ in range(2000)]
        it = iter(fresh * 10)
        new = median_time(lambda it=it: cache.classify(next(it)), 2000, min(repeat, 10))
        print(f"{label + ', new str from the wire':<34} {new * 1e6:>6.2f}")

    print()
    print("event loop: longest gap seen by a 1 ms ticker during one cold classification")
    print(f"{'chars':>8} {'classify ms':>12} {'loop gap ms':>12}")
    big = "SELECT " + ", ".join(f"coalesce(o.total, {i}) AS c{i}" for i in range(2500)) + \
        " FROM orders o"
    for sql in [MEDIUM, LONG, big]:
        spent, gap = asyncio.run(_loop_stall(sql, rules, cat))
        print(f"{len(sql):>8} {spent * 1e3:>12.1f} {gap * 1e3:>12.1f}")

    print()
    print("process pool (1 worker): round trip of one cold classification, ms")
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=1, initializer=_worker_init,
            initargs=(CORPUS["pii"], CORPUS["catalog"])) as pool:
        pool.submit(_worker_classify, "SELECT 1").result()
        for label, sql in (("short", SHORT), ("medium", MEDIUM), ("5 KB", LONG),
                           (f"{len(big) // 1000} KB", big)):
            n = 20 if len(sql) < 10_000 else 3
            t = median_time(lambda s=sql: pool.submit(_worker_classify, s).result(), n, repeat,
                            clock=time.perf_counter)
            local = median_time(lambda s=sql: classify(s, rules, cat), n, repeat,
                                clock=time.perf_counter)
            print(f"{label:<10} pool {t * 1e3:>8.2f}   in-process {local * 1e3:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
