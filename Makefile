# Every target creates .venv if missing; `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
LINT_PATHS := $(wildcard jdeq tests benchmarks notebooks)

.PHONY: test test-quick test-slow test-min demo bench docs lint venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m pytest -n 2 --dist worksteal -q

# The smoke tests only (a solve and its gradient, both layers, a tiny fit saved, loaded and resumed): a quick check.
test-quick: $(STAMP)
	$(PY) -m pytest -n 0 -q tests/test_smoke.py

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal -q -m slow

# The smoke tests (a solve and its gradient, both layers, a tiny fit with a checkpoint saved, loaded and resumed)
# against the lowest dependency versions pyproject.toml states (a separate venv).
MIN_VENV := .venv-min
test-min:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet $$($(PYTHON) .ci/lower_bounds.py) pytest
	$(MIN_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(MIN_VENV)/bin/python -m pytest -q tests/test_smoke.py

demo: $(STAMP)
	$(VENV)/bin/jdeq demo

# Peers (jaxopt, optimistix, torchdeq, torch) go into .venv via the `bench` extra; BENCH_ARGS adds options,
# e.g. `make bench BENCH_ARGS="--workloads mlp_hard --libraries jdeq,torchdeq"` (see docs/benchmarks.md).
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The site (docs/ and the API reference from the docstrings) into site/; --strict: any warning fails the build.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) $(MIN_VENV) runs .pytest_cache site build/jax-cache
