# The two set-up commands of the README. Each installs what it needs first (idempotent).
#   make quickstart   the main job on the embedded default (local Ray, local Zarr folder)
#   make test         the test suite
#   make test-long    the long fault-injection and cluster checks (CI runs both)
PYTHON ?= python3
# The Ray this machine runs: the newest tested, the one cluster.yaml's image has (a laptop submitting
# jobs runs the cluster's Ray). pyproject's range admits the others a cluster image may ship; left to
# itself pip's resolver may pick an older one.
RAY_VERSION := 2.60.0
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-long bench

install: $(VENV)/.installed

# torch first, pinned: here it resolves to a local CPU wheel; a looser spec would pull a multi-GB
# CUDA build. The package itself accepts any newer torch (a cluster keeps its CUDA build).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]" "ray[default,data,train,tune]==$(RAY_VERSION)"
	touch $@

quickstart: install
	$(BIN)/raywsl run -c configs/quickstart.yaml
	$(BIN)/raywsl inspect runs/quickstart

test: install
	$(BIN)/python -m pytest -q

test-long: install
	$(BIN)/python -m pytest -q -m long

bench: install
	$(BIN)/python benchmarks/ingest/bench_sdf.py
