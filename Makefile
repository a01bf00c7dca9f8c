# Developer entry points. The operator contract: `make up` runs the whole stack, `make test` the
# whole suite; both create .venv and (re)install the project when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install up test lint fmt bench soak

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

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/abl bench $(BENCH_ARGS)

soak: $(STAMP)
	$(BIN)/abl soak $(SOAK_ARGS)
