"""pgjdbc 42.7.13 scenarios (tests/clients/java/Matrix.java), direct vs through pgguard.

One JVM run per target holds every scenario; each test below checks one scenario's JSON.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from pgguard.localpg import LocalPostgres
from tests.clients.conftest import HERE, Target, assert_same, scenario_results, sqlstate_of

pytestmark = pytest.mark.timeout(300)

COMPARED = ["scram", "multi", "extended_5", "extended_0", "batch", "batch_error",
            "batch_refused", "refused_in_tx", "cursor", "copy", "cancel", "tx", "notify",
            "fatal"]
GUARDED_ONLY = ["tls_prefer", "tls_disable", "tls_require", "tls_direct", "cancel_tls", "lo"]


def run_matrix(jar: Path, t: Target, scenarios: list[str], timeout: float = 240) -> dict:
    pg = t.pg
    argv = ["java", "-cp", str(jar), str(HERE / "java" / "Matrix.java"),
            f"url=jdbc:postgresql://{t.host}:{t.port}/app",
            f"admin=jdbc:postgresql://127.0.0.1:{pg.port}/app",
            f"password={t.password()}", "scenarios=" + ",".join(scenarios)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return scenario_results(out.stdout, out.stderr, scenarios, "Matrix.java")


@pytest.fixture(scope="module")
def jdbc_results(pgjdbc_jar: Path, direct: Target, guarded: Target) -> dict[str, dict]:
    return {"direct": run_matrix(pgjdbc_jar, direct, COMPARED),
            "guarded": run_matrix(pgjdbc_jar, guarded, COMPARED + GUARDED_ONLY)}


def pair(results: dict[str, dict], name: str, guarded: Target) -> tuple[Any, Any]:
    d, g = results["direct"][name], results["guarded"][name]
    assert "crash" not in d, d
    assert_same(d, g, guarded_is_proxy=guarded.proxy is not None)
    return d, g


@pytest.mark.parametrize("name", COMPARED)
def test_same_as_direct(jdbc_results: dict, guarded: Target, name: str) -> None:
    pair(jdbc_results, name, guarded)


def test_expectations(jdbc_results: dict, guarded: Target) -> None:
    """What a user must see, beyond being equal to a direct run."""
    g = jdbc_results["guarded"]
    refused = f"E:{sqlstate_of(guarded)}"
    assert g["scram"] == {"row": [["app", "matrix-pgjdbc"]], "valid": True, "after": [[1]]}
    assert [r[0][0] for r in g["extended_5"]["rows"]] == [0, 2, 4, 6, 8, 10, 12]
    assert g["extended_5"]["prepared"] == [["S_1"]] and g["extended_0"]["prepared"] == []
    assert g["batch"]["committed"] == 5
    # A failing batch member rolls back the whole implicit transaction: only the later
    # prepared batch (ids 10..12) is committed.
    assert g["batch_error"] == {"error": "E:23505", "prepared_counts": "[1, 1, 1]",
                                "rows": [[10], [11], [12]], "committed": 3}
    assert g["batch_refused"]["error"] == refused and g["batch_refused"]["committed"] == 3
    assert g["refused_in_tx"] == {"refused": refused, "in_failed_tx": "E:25P02",
                                  "commit": "ok", "usable": [[5]], "committed": 0}
    assert g["cursor"] == {"plain": [45, 1035], "prepared": 30}
    assert g["copy"]["in"] == 300 and g["copy"]["bad"] == "E:22P02"
    assert g["cancel"] == {"got": "E:57014", "fast": True, "after": [[1]]}
    assert g["tx"]["rows"] == [[1, "kept"]] and g["tx"]["div"] == "E:22012"
    assert len(g["notify"]["notifications"]) == 3
    assert g["fatal"] == {"killed": [[1]], "error": "E:57P01", "closed": True}


def test_tls_and_channel_binding(jdbc_results: dict, guarded: Target) -> None:
    g = jdbc_results["guarded"]
    for name in ("tls_prefer", "tls_disable", "tls_direct"):
        assert g[name].get("row") == [[42]], (name, g[name])
    # Statement.cancel() on a TLS connection sends its CancelRequest after SSLRequest + TLS.
    assert g["cancel_tls"] == {"got": "E:57014", "fast": True, "after": [[1]]}, g["cancel_tls"]
    # pgguard never relays SCRAM-SHA-256-PLUS: channelBinding=require fails, cleanly and fast.
    assert "error" in g["tls_require"] and g["tls_require"]["seconds"] < 8, g["tls_require"]


def test_large_object_api_denied(jdbc_results: dict, guarded: Target) -> None:
    """LargeObjectManager uses FunctionCall (fastpath): refused, and the session stays usable."""
    lo = jdbc_results["guarded"]["lo"]
    assert lo == {"lo": "E:42501", "usable": [[6]]}, lo


@pytest.mark.slow
@pytest.mark.parametrize("pg", ["pg18"], indirect=True)  # one server version bounds the runtime
def test_large(pgjdbc_jar: Path, direct: Target, guarded: Target, pg: LocalPostgres) -> None:
    d = run_matrix(pgjdbc_jar, direct, ["large"])["large"]
    g = run_matrix(pgjdbc_jar, guarded, ["large"])["large"]
    assert d == g == {"rows": [1000000, 500000500000], "bind": [50 * 1024 * 1024, True],
                      "query": [[20 * 1024 * 1024]]}
