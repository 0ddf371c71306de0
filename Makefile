# Everything a fresh machine needs: `make serve` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: anything unpinned would pull a CUDA build of several GB.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/v4serve serve

# Two pytest workers, a test file to each at a time; then the Ray Serve tests alone, because their
# disaggregated transfers have deadlines that a second busy worker on 2 cores can make them miss.
WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --ignore tests/test_serve.py
	$(BIN)/python -m pytest -q tests/test_serve.py

bench: $(STAMP)
	$(BIN)/python -m load_tests.bench_model
