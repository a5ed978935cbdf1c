# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mlauth.demo

lint: $(STAMP)
	$(PY) -m ruff check mlauth tests benchmarks
	$(PY) -m ruff format --check mlauth tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy --strict

test: lint typecheck
	$(PY) -m pytest

# Full-size runs of every benchmark; rewrites benchmarks/results/ (tables, JSON, plots).
bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
