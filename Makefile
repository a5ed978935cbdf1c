# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck redis-server postgresql bench fuzz clean

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mlauth.cli.demo

lint: $(STAMP)
	$(PY) -m ruff check mlauth tests benchmarks
	$(PY) -m ruff format --check mlauth tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy --strict

# The Redis store's tests run a real redis-server (Debian's package); CI runs as root. The
# package may start a system daemon on port 6379; the tests start their own on a free port,
# so it is stopped again (if the machine has no service manager, nothing was started).
redis-server:
	@command -v redis-server >/dev/null || { \
		if [ "$$(id -u)" != 0 ]; then \
			echo "redis-server is missing and installing it needs root: run make test as root," \
				"or install it first (sudo apt-get install redis-server)" >&2; \
			exit 1; \
		fi; \
		echo "installing redis-server (Debian package) for the Redis store tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends redis-server >/dev/null || exit 1; \
		service redis-server stop >/dev/null 2>&1 || true; }

# The SQL store's tests run a real PostgreSQL server (Debian's postgresql package), which
# mlauth/testing/postgres_server.py starts as `nobody` when run as root. Its programs are
# looked for where that module looks: PATH, `pg_config --bindir`, /usr/lib/postgresql/*/bin.
# The package starts a system cluster on port 5432 where a service manager runs; the tests
# start their own on a free port, so it is stopped again.
postgresql:
	@command -v initdb >/dev/null && command -v postgres >/dev/null || \
	{ command -v pg_config >/dev/null && [ -x "$$(pg_config --bindir)/initdb" ]; } || \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		if [ "$$(id -u)" != 0 ]; then \
			echo "PostgreSQL's server programs are missing and installing them needs root: run" \
				"make test as root, or install them first (sudo apt-get install postgresql)" >&2; \
			exit 1; \
		fi; \
		echo "installing postgresql (Debian package) for the PostgreSQL store tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends postgresql >/dev/null || exit 1; \
		service postgresql stop >/dev/null 2>&1 || true; }

test: lint typecheck redis-server postgresql
	$(PY) -m pytest

# The fuzz properties (tests/test_fuzz_*.py) at full length: FUZZ_EXAMPLES examples each, where
# make test runs a short pass of each (docs/testing.md). Their statistics are printed at the end.
# pytest's log capture is off: it would keep every DEBUG record of every example in memory
# (the properties read the records themselves).
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP) redis-server
	MLAUTH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -p no:logging --hypothesis-show-statistics \
		tests/test_fuzz_answers.py tests/test_fuzz_env.py tests/test_fuzz_redis.py

# Full-size runs of every benchmark; rewrites benchmarks/results/ (tables, JSON, plots).
# The storm's `mlauth (redis)` row starts its own redis-server (and a PostgreSQL row its own
# postgres).
bench: $(STAMP) redis-server postgresql
	$(PY) -m benchmarks.run_all

# Everything the venv, the tools, the tests (hypothesis' example database) and a build
# (.ci/wheel-matrix, pip install -e) leave in the clone: all of it is in .gitignore.
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
