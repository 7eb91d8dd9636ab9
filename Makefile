# kmserve: `make run` starts the platform on 127.0.0.1:8000; `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every pip call (build environments included) keeps the local CPU build of torch.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test lint typecheck pytest bench-queue clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/kmserve up

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy registry clients server engines trainer_worker evals

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

bench-queue: install
	$(BIN)/python -m bench.queue

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
