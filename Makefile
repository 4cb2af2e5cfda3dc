# make run   - set everything up and run the dispatcher (router + log writer + a worker)
# make test  - set everything up and run every test (unit and integration)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test unit lint bench migrate clean soak

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Uses REDIS_URL / DATABASE_URL, or the local defaults, or private servers under .run/.
migrate: $(STAMP)
	$(PYTHON) scripts/services.py
	set -a && . .run/env && set +a && $(BIN)/python scripts/create-database.py && $(BIN)/alembic upgrade head

run: export PATH := $(abspath $(BIN)):$(PATH)
run: migrate
	honcho -e .run/env start

test: $(STAMP)
	scripts/ensure-services
	scripts/install-test-tools
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

# 5 minutes at 200 events/s with a random kill every 20 s (SOAK_SECONDS, SOAK_RATE, SOAK_KILL_EVERY_S).
soak: $(STAMP)
	scripts/ensure-services
	$(BIN)/python -m tests.faults.soak

bench: $(STAMP)
	scripts/ensure-services
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/eventbus contracts check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
