# TrialTwin: `make demo` sets up and runs the embedded server + SMART app + demo study;
# `make test` sets up and runs the whole test suite (what .ci/run calls).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/trialtwin compile-kernels
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/trialtwin demo

test: setup
	bash scripts/test.sh

test-fast: setup
	$(BIN)/python -m pytest -m "unit or api" -q

clean:
	rm -rf $(VENV) data test-artifacts
