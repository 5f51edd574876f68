"""One of pgguard's compiled modules loaded from its .py source as plain Python, the reference
the compiled build is tested against (each test that has a `module` fixture runs both)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest


def pure(module: ModuleType) -> ModuleType:
    """`module` (e.g. pgguard.proxy.session) from its .py, under another name, loaded once."""
    stem = module.__name__.rpartition(".")[2]
    name = f"pgguard_pure_{stem}"
    loaded = sys.modules.get(name)
    if loaded is None:
        source = Path(str(module.__file__)).with_name(f"{stem}.py")
        spec = importlib.util.spec_from_file_location(name, source)
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded  # dataclasses look their module up there
        spec.loader.exec_module(loaded)
    return loaded


def compiled_or_pure(param: str, installed: ModuleType, *needs: ModuleType) -> ModuleType:
    """What a `module` fixture with params ["compiled", "pure"] gives: the plain Python one, or
    the installed one, which must be compiled (and so must the modules it `needs`): on CI
    (CI=true) a build that fell back to pure Python fails here; elsewhere it is skipped."""
    if param == "pure":
        return pure(installed)
    missing = [m.__name__ for m in (installed, *needs) if str(m.__file__).endswith(".py")]
    if missing:
        why = f"not compiled (setup.py needs Cython and a C compiler): {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return installed
