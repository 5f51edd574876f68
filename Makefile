# Every target builds its own virtualenv from pyproject.toml: nothing relies on hand-installed packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

# The modules setup.py compiles with Cython: rebuilt when they change (a stale extension would
# be imported instead of the edited .py; the tests refuse to start then).
COMPILED := $(VENV)/.compiled
COMPILED_SOURCES := setup.py pgguard/protocol/framing.py pgguard/protocol/framing.pxd \
	pgguard/proxy/session.py

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP) $(COMPILED)

$(COMPILED): $(STAMP) $(COMPILED_SOURCES)
	$(BIN)/pip install -q --no-deps -e .
	touch $(COMPILED)

venv: $(COMPILED)

demo: $(COMPILED)
	$(BIN)/python -m pgguard demo

test: $(COMPILED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(COMPILED)
	$(BIN)/ruff check pgguard tests benchmarks
	$(BIN)/mypy

bench: $(COMPILED)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
