# p2psc: `make demo` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-smoke fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,lint,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python test/run_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q test

lint: $(STAMP)
	$(BIN)/python -m ruff check p2psc
	$(BIN)/python -m mypy p2psc

bench: $(STAMP)
	$(BIN)/python -m bench

bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke

# the parsers under hypothesis in a long mode for FUZZ_SECONDS (test/fuzz.py); not part of `test`
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python test/fuzz.py $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info
