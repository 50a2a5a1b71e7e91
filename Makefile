# One venv, one install, one test command. `make test` works on a fresh machine (Python 3.11,
# registry-only network) in about 20 minutes on 2 cores; `.ci/run` calls `make test`, then `make test-cluster`
# (the two-node Ray cluster check, ~3.5 minutes more), which fits CI's 90-minute limit.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-cluster lint demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps audioldm_eval==0.0.3 ssr_eval==0.0.7 tinysoundfont==0.3.7  # see pyproject.toml
	touch $(STAMP)

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest -q -m "not cluster"

test-cluster: venv
	$(PY) -m pytest -q -m cluster

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not cluster"

demo: venv
	$(PY) ray_jobs/batch_generate.py --manifest examples/prompts.parquet

clean:
	rm -rf $(VENV) outputs .pytest_cache
