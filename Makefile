# Quick start: `make demo` then `make test`; `make docs` builds the site. Each target creates .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export MPLBACKEND := Agg
export PYTHONUNBUFFERED := 1

.PHONY: demo lint test test-all bench docs docs-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo,test]"
	touch $@ $(VENV)/.runtime

$(VENV)/.docs: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo,docs]"
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(BIN)/python examples/nile.py
	$(BIN)/python examples/bayesian_local_level.py
	$(BIN)/python examples/rul_cmapss.py

lint: $(VENV)/.test
	$(BIN)/python -m ruff check probssm tests examples benchmarks

test: $(VENV)/.test lint
	$(BIN)/python -m pytest -m "not slow" -q -n 2 --dist loadfile --durations=30

test-all: $(VENV)/.test
	HYPOTHESIS_PROFILE=all $(BIN)/python -m pytest -q -n 2 --dist loadfile

# The documentation site (mkdocs, --strict: any warning fails). `make docs` executes every
# examples/*.py for the gallery and the tutorials in docs/tutorials/ (slow the first time; results
# are cached in .cache/); open site/index.html. `make docs-check` (CI) builds the same site without
# executing anything (the tutorials run in `make test`, the examples in `make demo` / `make docs`).
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 PROBSSM_DOCS_EXECUTE=1 $(BIN)/python -m mkdocs build --strict

docs-check: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 PROBSSM_DOCS_EXECUTE=0 $(BIN)/python -m mkdocs build --strict

bench: $(VENV)/.test
	for b in benchmarks/*.py; do echo "## $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) figures .pytest_cache site .cache
