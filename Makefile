# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Each creates .venv with python3 -m venv, installs the project with the extras it
# needs (torch pinned by constraints.txt), and runs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-accuracy clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[compress,runtime,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgeglm demo

# The whole suite, slow tests included (CI runs exactly this). pytest exits 5 when it
# collected no test: that is a failure here, never a pass.
test: $(STAMP)
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Fast suite only, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-accuracy: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py --data $${EDGEGLM_CMAPSS:-../shared/datasets/cmapss} --subset FD001

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
