# Set-up and everyday commands. `make run` and `make test` install into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0: a CPU build from this machine's local wheel store; on a GPU box PyPI serves the CUDA
# build of the same version. Override with TORCH_SPEC='torch==X --index-url ...' for another build.
# An already-installed torch (e.g. a CUDA image) is kept as it is.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean mlflow-server

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/minordpo serve

# `mlflow server` for the MLflow tracking tests: the full mlflow package pins pyarrow<26, so it gets its own
# venv (the service itself only needs the mlflow-skinny client)
MLFLOW_VENV ?= .mlflow-server
$(MLFLOW_VENV)/bin/mlflow:
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install -q mlflow

mlflow-server: $(MLFLOW_VENV)/bin/mlflow

test: $(STAMP) $(MLFLOW_VENV)/bin/mlflow
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/train_vs_trl.py

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) var .pytest_cache
