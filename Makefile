# Developer entry points. The operator contract: `make up` runs the whole stack, `make test` the
# whole suite; both create .venv and (re)install the project when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install up test lint typecheck check fmt bench bench-usage bench-fairness bench-batch bench-abuse \
	soak fuzz k8s-secrets proof-constraints

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 (the `worker` extra) resolves to the CPU wheel kept on these machines.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[worker,dev]'
	touch $@

up: $(STAMP)
	$(BIN)/abl up

test: $(STAMP)
	$(BIN)/python -m pytest -ra --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Strict where it is cheap (the torch-free packages), plain mypy on the rest.
typecheck: $(STAMP)
	$(BIN)/mypy --strict contract db api
	$(BIN)/mypy workers infra migrations

# What CI runs before the tests.
check: lint typecheck

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/abl bench $(BENCH_ARGS)

# Billing queries at scale: a scratch database on ABL_BENCH_DATABASE_URL's server (default: the
# machine's PostgreSQL, postgres@127.0.0.1:5432), 1M requests, 3M ledger rows; docs/billing.md.
bench-usage: $(STAMP)
	$(BIN)/python -m infra.bench.billing $(if $(ABL_BENCH_DATABASE_URL),--database-url $(ABL_BENCH_DATABASE_URL)) $(BENCH_USAGE_ARGS)

# Message Batches: a 2,000-request batch against interactive c=16 throughput, interactive TTFT
# beside it, a worker SIGKILLed mid-batch (infra/bench/batch.py, docs/batches.md).
bench-batch: $(STAMP)
	$(BIN)/python -m infra.bench.batch $(BENCH_BATCH_ARGS)

# Account B's time to first token while account A floods 300 streams (infra/bench/fairness.py).
# Issue 14's proof on the default model: 100 forced tool calls and 100 structured outputs on
# SmolLM2 through the engine, each valid against its schema (make test runs 10 + 10).
proof-constraints: $(STAMP)
	ABL_CONSTRAINT_PAIRS=100 $(BIN)/python -m pytest -q tests/model/test_constrained_smollm2.py

bench-fairness: $(STAMP)
	$(BIN)/python -m infra.bench.fairness $(FAIRNESS_ARGS)

# Huge bodies without valid credentials (and with a key) against a fresh stack: the API's memory
# and /healthz latency meanwhile; bench-results/abuse.json, docs/security.md.
bench-abuse: $(STAMP)
	$(BIN)/python -m infra.bench.abuse $(BENCH_ABUSE_ARGS)

# The Secrets infra/deploy/k8s generates, with fresh values (files under its secrets/, git-ignored).
k8s-secrets: $(STAMP)
	$(BIN)/python -m infra.cli.k8s_secrets $(K8S_SECRETS_ARGS)

soak: $(STAMP)
	$(BIN)/abl soak $(SOAK_ARGS)

# Schemathesis against a fresh stack's OpenAPI document: ~4800 generated requests (valid and
# invalid) to every /v1 operation, none may get a 5xx. `make test` runs ~200 of them.
FUZZ_EXAMPLES ?= 600
fuzz: $(STAMP)
	ABL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -o timeout=3600 \
		tests/integration/test_fuzz.py $(PYTEST_ARGS)
