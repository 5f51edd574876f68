"""pgguard's per-transaction work in process: the number to compare two commits by.

The pgbench and latency benchmarks measure the real thing, but on a small shared machine their
CPU-per-transaction column moves by ±15% between runs. This one takes the sockets, pgbench and
PostgreSQL away: a real `Session`, wired by `App` (policy, metrics, audit trail to a file) as
`pgguard run` wires it, with in-memory transports, fed what pgbench `-S -M prepared` sends
(Bind/Describe/Execute/Sync of a prepared SELECT, as libpq sends them) and what the server
answers (BindComplete, RowDescription, DataRow, CommandComplete, ReadyForQuery).

    .venv/bin/python -m benchmarks.hotpath                  # CPU µs per transaction (min, median)
    .venv/bin/python -m benchmarks.hotpath --instructions   # valgrind: instructions per transaction

`--instructions` runs the loop twice under `valgrind --tool=callgrind` (N and 5·N
transactions, PYTHONHASHSEED=0) and divides the difference: start-up cancels out and the
result repeats to within about 1% on a busy machine. SHA-256 runs valgrind's generic code
path, so the audit's hashing counts heavier than on a CPU with SHA extensions.
BENCH_POLICY=realistic (default) or none, as for the other benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.targets import pgguard_config

STATEMENT = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"


class _Transport:
    """Takes writes and drops them: the relay's output, without a socket."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: object) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads: the audit writer counts too
    return r.ru_utime + r.ru_stime


async def _run(policy: str, counts: list[int]) -> list[float]:
    """Run `counts[i]` transactions for each i; CPU seconds of each run."""
    from pgguard.app import App
    from pgguard.config import load_config
    from pgguard.observability.audit import AuditConfig, AuditSink
    from pgguard.protocol import messages as m
    from pgguard.proxy.session import SERVER_READY_TABLE, STATES, Session

    with tempfile.TemporaryDirectory(prefix="pgguard-hotpath-") as tmp:
        home = Path(tmp)
        path = home / "pgguard.yaml"
        path.write_text(json.dumps(pgguard_config(policy, home, admin_port=9)))
        config = load_config(path, {"listen": "127.0.0.1:1", "upstream": "127.0.0.1:2"})
        app = App(config)
        if config.audit.path:
            app.audit = AuditSink(AuditConfig.from_settings(config.audit))
            app.audit.start()
        app._wire_observers()
        session = Session(app.ctx, "127.0.0.1", False)
        for side in ("client", "server"):  # as client_connected() and the upstream set them
            transport = _Transport()
            setattr(session, side, transport)
            setattr(session, f"_write_{side}", transport.write)
        session.state, session.user, session.database = STATES["ready"], "app", "app"
        session._sframer.set_table(SERVER_READY_TABLE)  # as the server's first ReadyForQuery does
        app.ctx.session_ready(session)
        session.client_data(m.parse(b"P0_1", STATEMENT, [23]) + _msg(b"S", b""))
        session.server_data(_msg(b"1", b"") + _msg(b"Z", b"I"))
        # As libpq sends it for pgbench: Bind, Describe (portal), Execute, Sync.
        request = (_msg(b"B", b"\0P0_1\0" + struct.pack("!hhih", 1, 1, 4, 1) + b"\0\0\0\x2a"
                        + struct.pack("!hh", 1, 1))
                   + _msg(b"D", b"P\0") + m.execute(b"") + _msg(b"S", b""))
        reply = (_msg(b"2", b"")
                 + _msg(b"T", struct.pack("!h", 1) + b"abalance\0"
                        + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
                 + _msg(b"D", struct.pack("!hi", 1, 4) + b"\0\0\0\x05")
                 + _msg(b"C", b"SELECT 1\0") + _msg(b"Z", b"I"))
        for _ in range(2000):
            session.client_data(request)
            session.server_data(reply)
        gc.collect()
        gc.freeze()  # as App.start() does
        spent = []
        for n in counts:
            start = _cpu()
            for i in range(n):
                session.client_data(request)
                session.server_data(reply)
                if i % 64 == 0:
                    await asyncio.sleep(0)  # the loop turns, as it does between reads
            if app.audit is not None:
                app.audit.flush_sync()
            spent.append(_cpu() - start)
        if app.audit is not None:
            app.audit.close_sync()
        return spent


def _instructions(policy: str, n: int) -> int:
    """Instructions of a whole run of `n` transactions under callgrind."""
    with tempfile.TemporaryDirectory(prefix="pgguard-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONHASHSEED": "0", "BENCH_POLICY": policy}
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, "-m", "benchmarks.hotpath", "--once", str(n)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        match = re.search(r"^summary:\s*(\d+)", out.read_text(), re.M)
        if match is None:
            raise SystemExit("callgrind wrote no summary")
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath")
    parser.add_argument("--instructions", action="store_true",
                        help="instructions per transaction under valgrind (slow: ~3 min)")
    parser.add_argument("-n", type=int, default=5000, help="transactions per timed run")
    parser.add_argument("-r", type=int, default=30, help="timed runs (min and median shown)")
    parser.add_argument("--once", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    policy = os.environ.get("BENCH_POLICY", "realistic")
    if args.once is not None:
        asyncio.run(_run(policy, [args.once]))
        return
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
        small, large = 1000, 5000
        per = (_instructions(policy, large) - _instructions(policy, small)) / (large - small)
        print(f"policy {policy}: {per / 1000:.1f}k instructions per transaction "
              f"(callgrind, {large} - {small} transactions)")
        return
    spent = asyncio.run(_run(policy, [args.n] * args.r))
    per = sorted(s / args.n * 1e6 for s in spent)
    print(f"policy {policy}: CPU µs per transaction, min {per[0]:.2f}, "
          f"median {statistics.median(per):.2f} ({args.r} runs of {args.n})")


if __name__ == "__main__":
    main()
