# p2psc: `make demo` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# one stamp per set of extras: the demo needs p2psc alone, `make test` adds the test extra,
# `make lint` and `make bench` theirs (each stamp installs p2psc in editable mode)
DEMO_STAMP  := $(VENV)/.installed-demo
TEST_STAMP  := $(VENV)/.installed-test
LINT_STAMP  := $(VENV)/.installed-lint
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint bench bench-smoke fuzz mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(DEMO_STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# test_bench_smoke.py runs `python -m bench --smoke`, which needs no extra of its own
$(TEST_STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(LINT_STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[lint]'
	touch $@

$(BENCH_STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/python test/run_demo.py

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q test

lint: $(LINT_STAMP)
	$(BIN)/python -m ruff check p2psc
	$(BIN)/python -m mypy p2psc

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

bench-smoke: $(BENCH_STAMP)
	$(BIN)/python -m bench --smoke

# the parsers under hypothesis in a long mode for FUZZ_SECONDS (test/fuzz.py); not part of `test`
FUZZ_SECONDS ?= 60
fuzz: $(TEST_STAMP)
	$(BIN)/python test/fuzz.py $(FUZZ_SECONDS)

# mutation testing of the sans-IO core with mutmut ([tool.mutmut] in pyproject.toml,
# docs/MUTATION.md); not part of `test`. Starts afresh in ./mutants, runs MUTATION_CHILDREN
# mutants at a time, then prints the score of each module. MUTANTS narrows the run to mutant
# name patterns, e.g. MUTANTS='p2psc._proto.replay.*'.
MUTATION_STAMP := $(VENV)/.installed-mutation
MUTATION_CHILDREN ?= 2
MUTANTS ?=
$(MUTATION_STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,mutation]'
	touch $(MUTATION_STAMP)

mutation: $(MUTATION_STAMP)
	rm -rf mutants
	$(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS)
	$(BIN)/python test/mutation_score.py

clean:
	rm -rf $(VENV) build *.egg-info mutants
