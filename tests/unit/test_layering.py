"""STYLE.md's layout, checked: pure packages never import asyncio or sockets; admin and proxy
never import each other (app.py joins them); nothing below app/cli imports the top layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pgguard"
PURE = ("protocol", "classify", "policy", "stepup")
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "uvloop", "aiohttp", "asyncpg"}
TOP = {"pgguard.app", "pgguard.cli", "pgguard.demo", "pgguard.elevation"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((PKG / package).rglob("*.py"))


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_do_no_io(package: str) -> None:
    offenders = {str(p.relative_to(PKG)): sorted(n for n in imports(p)
                                                 if n.split(".")[0] in IO_MODULES)
                 for p in modules(package)}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("package,forbidden", [("admin", "pgguard.proxy"),
                                               ("proxy", "pgguard.admin")])
def test_admin_and_proxy_do_not_import_each_other(package: str, forbidden: str) -> None:
    bad = {str(p.relative_to(PKG)) for p in modules(package)
           if any(n == forbidden or n.startswith(forbidden + ".") for n in imports(p))}
    assert bad == set()


def test_only_the_top_layer_imports_the_top_layer() -> None:
    bad = {}
    for p in sorted(PKG.rglob("*.py")):
        mod = "pgguard." + ".".join(p.relative_to(PKG).with_suffix("").parts)
        if mod.removesuffix(".__init__") in TOP or mod == "pgguard.__main__":
            continue
        hits = sorted(n for n in imports(p) if n in TOP)
        if hits:
            bad[mod] = hits
    assert bad == {}
