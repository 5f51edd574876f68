"""Fixtures of the client compatibility matrix (PROTOCOL.md §4).

Every client runs the same scenarios against two targets of the same server: `direct` (the
PostgreSQL of the `pg` fixture) and `guarded` (a `pgguard run` in front of it, with client-side
TLS and the `debug.refuse_pattern` test hook). The results are JSON-able values that must be
equal once `canon()` has mapped the one expected difference: a statement that matches the
refuse pattern calls `pgguard_refuse_me()`, a function that raises P0001 when it runs, so direct
it fails at execution with P0001 and through pgguard it is refused with 42501. (A failure at
parse time, such as an undefined function, would hide the refusal: pgguard decides at Query and
at the first Execute, and PostgreSQL's own earlier error comes first.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pgguard.localpg import LocalPostgres
from tests.proxyproc import ProxyProcess

HERE = Path(__file__).resolve().parent
# Direct this fails when it runs (P0001, see refusable_function); pgguard refuses it with 42501.
REFUSED_SQL = "SELECT pgguard_refuse_me()"
REFUSE_PATTERN = "pgguard_refuse_me"
DIRECT_REFUSED_STATE = "P0001"
POLICY_STATE = "42501"
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class Target:
    """Where a client connects: PostgreSQL itself or pgguard in front of it."""

    kind: str  # "direct" | "guarded"
    pg: LocalPostgres
    port: int
    proxy: ProxyProcess | None = None

    host = "127.0.0.1"

    @property
    def guarded(self) -> bool:
        return self.kind == "guarded"

    def dsn(self, user: str = "app", dbname: str = "app", **extra: str) -> str:
        params = {"host": self.host, "port": str(self.port), "user": user,
                  "password": self.password(user), "dbname": dbname, "sslmode": "disable",
                  "connect_timeout": "10", **extra}
        return " ".join(f"{k}={quote_conninfo(v)}" for k, v in params.items())

    def password(self, user: str = "app") -> str:
        return self.pg.password if user == "app" else user

    def log(self) -> str:
        return self.proxy.log() if self.proxy else ""


def quote_conninfo(value: str) -> str:
    if value and not any(ch in value for ch in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def guard_config(certs: tuple[Path, Path], **more: Any) -> dict[str, Any]:
    crt, key = certs
    cfg: dict[str, Any] = {
        "tls": {"mode": "allow", "cert": str(crt), "key": str(key)},
        "debug": {"refuse_pattern": REFUSE_PATTERN},
    }
    cfg.update(more)
    return cfg


@pytest.fixture(scope="module")
def direct(pg: LocalPostgres) -> Target:
    pg.psql("CREATE OR REPLACE FUNCTION public.pgguard_refuse_me() RETURNS int LANGUAGE plpgsql"
            " AS $$BEGIN RAISE EXCEPTION 'pgguard_refuse_me ran' USING ERRCODE = 'P0001';"
            " END$$;", dbname="app")
    return Target("direct", pg, pg.port)


@pytest.fixture(scope="module")
def guarded(pg: LocalPostgres, direct: Target, certs: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """pgguard in front of `pg` (plaintext upstream leg, TLS toward the client allowed)."""
    proxy = ProxyProcess(pg, tmp_path_factory.mktemp("guard"), guard_config(certs),
                         via_socket=False, extra_args=[])
    proxy.start()
    try:
        yield Target("guarded", pg, proxy.port, proxy)
    finally:
        proxy.stop()


def reset_table(pg: LocalPostgres, name: str = "m") -> None:
    """(Re)create table `name(id int primary key, v text)`, owned by app and empty."""
    pg.psql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY, v text);"
            f" ALTER TABLE {name} OWNER TO app;", dbname="app")


def count_rows(pg: LocalPostgres, name: str = "m") -> int:
    return int(pg.psql(f"SELECT count(*) FROM {name}", dbname="app").strip())


# -- comparison -------------------------------------------------------------------------------

def canon(value: Any, refused_state: str) -> Any:
    """Replace the SQLSTATE of the refused statement by a marker, recursively."""
    if isinstance(value, dict):
        return {k: canon(v, refused_state) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canon(v, refused_state) for v in value]
    if value == refused_state or value == f"E:{refused_state}":
        return "REFUSED"
    return value


def assert_same(direct_result: Any, guarded_result: Any, *, guarded_is_proxy: bool = True) -> None:
    """The user-visible results through pgguard equal the direct ones."""
    refused = POLICY_STATE if guarded_is_proxy else DIRECT_REFUSED_STATE
    assert canon(guarded_result, refused) == canon(direct_result, DIRECT_REFUSED_STATE)


def sqlstate_of(refused_on: Target) -> str:
    """The SQLSTATE a client must see for REFUSED_SQL on this target."""
    if refused_on.guarded:
        return POLICY_STATE
    return DIRECT_REFUSED_STATE


# -- external client runtimes -----------------------------------------------------------------

def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if ON_CI:
            pytest.fail(f"{name} is missing on CI")
        pytest.skip(f"{name} is not installed on this machine")
    return path


@pytest.fixture(scope="session")
def pgjdbc_jar() -> Path:
    """pgjdbc 42.7.13 from the local Maven repository, fetched with mvn if absent."""
    need_tool("java")
    jar = (Path.home() / ".m2/repository/org/postgresql/postgresql/42.7.13"
           / "postgresql-42.7.13.jar")
    if not jar.exists():
        mvn = need_tool("mvn")
        subprocess.run([mvn, "-q", "dependency:get",
                        "-Dartifact=org.postgresql:postgresql:42.7.13"], check=True, timeout=300)
    assert jar.exists(), f"{jar} missing after mvn dependency:get"
    return jar


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """Install the pinned node-postgres packages (npm ci from the committed lock file)."""
    need_tool("node")
    npm = need_tool("npm")
    node_dir = HERE / "node"
    marker = node_dir / "node_modules" / ".package-lock.json"
    lock = node_dir / "package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=node_dir, check=True, timeout=300)
    return node_dir / "node_modules"


def scenario_results(stdout: str, stderr: str, scenarios: list[str], runner: str) -> dict[str, Any]:
    """Collect the `{"scenario", "result"}` JSON lines a runner printed; every scenario must
    have one."""
    results: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            results[obj["scenario"]] = obj["result"]
    missing = [s for s in scenarios if s not in results]
    assert not missing, f"{runner} gave no result for {missing}:\n{stderr[-3000:]}"
    return results
