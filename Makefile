# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv on first use.
# torch is pinned to the CPU build 2.13.0 (constraints.txt); GPU users: see README, "GPU workers".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bertq-installed
# transformers 4.57.6 beside the venv, for the parity references (see tests/side-tf457.txt)
SIDE := $(VENV)/side-tf457
SIDE_STAMP := $(SIDE)/.installed

.PHONY: demo test lint bench faults venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[worker,gateway,demo,test,bench,openvino,otel]'
	touch $(STAMP)

$(SIDE_STAMP): tests/side-tf457.txt $(STAMP)
	rm -rf $(SIDE)
	$(PY) -m pip install -q --no-deps --target $(SIDE) -r tests/side-tf457.txt
	touch $(SIDE_STAMP)

venv: $(STAMP) $(SIDE_STAMP)

demo: $(STAMP)
	$(VENV)/bin/bertq demo

# Three test processes (pytest-xdist; most tests wait on servers and workers, so three keep two cores
# busy), each taking whole modules, so that a module's fixtures (servers, conversions, big inputs) are
# built once; the slowest modules go first (tests/conftest.py).
test: lint $(SIDE_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -n 3 --dist loadscope --no-loadscope-reorder

# ruff (lint and format) and mypy, configured in pyproject.toml; `make test` runs them first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP) $(SIDE_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m bench

clean:
	rm -rf $(VENV) bench/out

# The long fault-injection suite (tests/faults with BERTQ_FAULTS=full): real servers and workers,
# faults injected, every job counted; rewrites the table in RELIABILITY.md.
faults: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 BERTQ_FAULTS=full $(PY) -m pytest -q -p no:cacheprovider tests/faults
