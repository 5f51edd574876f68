# Every target builds its own virtualenv from pyproject.toml: nothing relies on hand-installed packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

# The modules setup.py compiles with Cython are prerequisites too: an edited one is rebuilt (a
# stale extension would be imported instead of the edited .py; the tests refuse to start then).
COMPILED_SOURCES := setup.py pgguard/protocol/framing.py pgguard/protocol/framing.pxd \
	pgguard/proxy/session.py pgguard/proxy/session.pxd \
	pgguard/observability/audit.py pgguard/observability/audit.pxd \
	pgguard/observability/_auditline.pyx pgguard/observability/tally.py \
	pgguard/proxy/_clock.pyx pgguard/proxy/_clock.pxd pgguard/proxy/_clock.py \
	pgguard/proxy/_io.pyx pgguard/proxy/_io.pxd pgguard/proxy/_io.py \
	pgguard/observability/tally.pxd

$(STAMP): pyproject.toml $(COMPILED_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pgguard demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pgguard tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
