"""node-postgres 8.23.1 (+ pg-cursor, pg-copy-streams) scenarios (tests/clients/node/matrix.js),
direct vs through pgguard. One node run per target holds every scenario."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.clients.conftest import HERE, Target, assert_same, scenario_results, sqlstate_of

pytestmark = pytest.mark.timeout(300)

COMPARED = ["scram", "multi", "extended", "refused", "cursor", "copy", "tx", "notify", "fatal"]
GUARDED_ONLY = ["tls_default", "tls_channel_binding", "tls_direct"]


def run_matrix(node_modules: Path, t: Target, scenarios: list[str],
               timeout: float = 240) -> dict:
    cfg = {"host": t.host, "port": t.port, "adminPort": t.pg.port, "password": t.password(),
           "scenarios": scenarios}
    out = subprocess.run(["node", str(HERE / "node" / "matrix.js"), json.dumps(cfg)],
                         capture_output=True, text=True, timeout=timeout, cwd=HERE / "node")
    return scenario_results(out.stdout, out.stderr, scenarios, "matrix.js")


@pytest.fixture(scope="module")
def node_results(node_modules: Path, direct: Target, guarded: Target) -> dict[str, dict]:
    return {"direct": run_matrix(node_modules, direct, COMPARED),
            "guarded": run_matrix(node_modules, guarded, COMPARED + GUARDED_ONLY)}


@pytest.mark.parametrize("name", COMPARED)
def test_same_as_direct(node_results: dict, guarded: Target, name: str) -> None:
    d, g = node_results["direct"][name], node_results["guarded"][name]
    assert "crash" not in d, d
    assert_same(d, g, guarded_is_proxy=guarded.proxy is not None)


def test_expectations(node_results: dict, guarded: Target) -> None:
    g = node_results["guarded"]
    refused = f"E:{sqlstate_of(guarded)}"
    assert g["scram"] == {"row": [["app", "matrix-node"]]}
    assert g["extended"]["prepared"] == [["matrix_q"]]
    assert g["refused"] == {"simple": refused, "extended": refused, "in_tx": refused,
                            "in_failed_tx": "E:25P02", "commit": "ROLLBACK", "usable": [[5]],
                            "committed": 0}
    assert g["cursor"] == {"batches": [10, 10, 10, 10, 5], "after": [[1]]}
    assert g["copy"]["in"] == 300 and g["copy"]["bad"] == "E:22P02"
    assert g["tx"] == {"commit": "COMMIT", "rollback": "ROLLBACK", "dup": "E:23505",
                       "commit_after_error": "ROLLBACK", "rows": [[1, "kept"]]}
    assert len(g["notify"]["notifications"]) == 3
    # node-pg reports the server's FATAL, then its own "terminated unexpectedly".
    assert g["fatal"]["killed"] == 1 and g["fatal"]["events"][0] == "event:57P01"


def test_tls(node_results: dict, guarded: Target) -> None:
    """Both channel-binding settings work: pgguard's plaintext upstream offers no -PLUS."""
    g = node_results["guarded"]
    for name in GUARDED_ONLY:
        assert g[name].get("row") == [[42]] and g[name]["ssl"], (name, g[name])


@pytest.mark.slow
@pytest.mark.parametrize("pg", ["pg18"], indirect=True)  # one server version bounds the runtime
def test_large(node_modules: Path, direct: Target, guarded: Target) -> None:
    d = run_matrix(node_modules, direct, ["large"])["large"]
    g = run_matrix(node_modules, guarded, ["large"])["large"]
    assert d == g == {"rows": [1000000, 500000500000], "bind": [50 * 1024 * 1024, True],
                      "query": 20 * 1024 * 1024}
