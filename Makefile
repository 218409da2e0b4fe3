# Two commands a user needs: `make reproduce` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# On machines whose pip points at a local CPU wheel of torch (PIP_FIND_LINKS), pin that wheel so pip never
# pulls a multi-GB CUDA build; elsewhere take whatever torch pip resolves.
TORCH_SPEC ?= $(shell w=$$(ls $${PIP_FIND_LINKS:-/nonexistent}/torch-*+cpu-*.whl 2>/dev/null | head -1); \
	if [ -n "$$w" ]; then basename $$w | sed -E 's/^torch-([0-9.]+)\+cpu.*/torch==\1/'; else echo torch; fi)
SMOKE ?= 0
# the exact versions that produced figures/ (make lock refreshes them)
LOCK := constraints.txt
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb notebooks/[0-9][0-9][a-z]_*.ipynb))
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint reproduce model bench lock regression clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[notebooks,dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: setup
	$(PY) -m pytest tests
	$(MAKE) --no-print-directory reproduce SMOKE=1 OUTDIR=$$(mktemp -d)

lint: setup
	$(VENV)/bin/ruff check scope tests

OUTDIR ?=
reproduce: setup
	$(PY) -m scope.reproduce $(if $(filter 1,$(SMOKE)),--smoke) $(if $(OUTDIR),--out $(OUTDIR))

# Refresh the lock: a fresh environment with the newest releases pyproject.toml admits, frozen. Afterwards run
# make reproduce (and python -m scope.regression --write) and commit what changed.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[notebooks,dev]"
	.venv-lock/bin/python -m scope.lock --write $(LOCK)
	rm -rf .venv-lock

# The small fixed sweep of tests/test_regression.py, rewritten after a deliberate change (review its diff).
regression: setup
	$(PY) -m scope.regression --write

model: setup
	$(PY) -m scope.mini.train --all

bench: setup
	$(PY) -m scope.bench select
	$(PY) -m scope.bench e2e

clean:
	rm -rf $(VENV) .pytest_cache
