"""Benchmarks behind `make bench` (never run by `make test`).

- `pgbench_compare`: pgbench `-S` TPS direct vs pgbouncer (session mode) vs pgguard, interleaved;
- `latency`: asyncpg `SELECT 1` round-trip latency (p50/p99) through the same targets;
- `targets`: starts the PostgreSQL server, pgbouncer and pgguard those two measure;
- `bare_relay`: a minimal asyncio.Protocol byte relay, the ceiling a Python proxy can reach.

`python -m benchmarks` runs both proxy benchmarks, then the classifier's if it is present.
benchmarks/README.md says what each number means and the numbers measured so far.
"""
