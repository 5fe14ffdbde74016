# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Each creates .venv with python3 -m venv, installs the project with the extras it
# needs (torch pinned by constraints.txt), and runs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed

# The gateway side: a second venv with `.[runtime]` alone (no torch), and the runtime tests it
# runs against fixtures the main venv builds (tests/runtime_fixtures.py).
RT_VENV  ?= .venv-runtime
RT_BIN   := $(RT_VENV)/bin
RT_STAMP := $(RT_VENV)/.installed
FIXTURES ?= build/test-fixtures

# LiteRT: a third venv with the `litert` extra (litert-torch pulls TensorFlow/JAX, ≈2.4 GB), kept
# apart so the main venv stays light; it runs the tests marked `litert`.
LT_VENV  ?= .venv-litert
LT_BIN   := $(LT_VENV)/bin
LT_STAMP := $(LT_VENV)/.installed

.PHONY: demo test test-fast test-runtime test-arm test-litert lint bench-accuracy clean

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

# The runtime tests in a venv holding `.[runtime]` only: what a gateway installs. torch must not be
# importable there; the bundles come from $(FIXTURES), built by the main venv.
test-runtime: $(RT_STAMP) $(FIXTURES)/fixtures.json
	@if $(RT_BIN)/python -c 'import torch' 2>/dev/null; then \
	  echo "make test-runtime: torch is importable in $(RT_VENV); the runtime extra must not pull it" >&2; exit 1; fi
	@EDGEGLM_TEST_FIXTURES=$(CURDIR)/$(FIXTURES) $(RT_BIN)/python -m pytest -q tests/runtime; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-runtime: pytest collected no tests" >&2; exit 1; fi; exit $$rc
	$(RT_BIN)/python tests/runtime_fixtures.py compare $(FIXTURES)

# The same runtime tests on arm64, emulated (qemu-user via binfmt) in a Debian bookworm root
# cached under ~/.cache/edgeglm; needs root, mmdebstrap, qemu-user-static (see .ci/arm-test.sh).
test-arm: $(FIXTURES)/fixtures.json
	bash .ci/arm-test.sh $(FIXTURES)

$(RT_STAMP): pyproject.toml constraints.txt
	@test -x $(RT_BIN)/python || $(PYTHON) -m venv $(RT_VENV)
	$(RT_BIN)/python -m pip install --quiet --upgrade pip
	$(RT_BIN)/python -m pip install --quiet -c constraints.txt -e '.[runtime]' 'pytest>=8' 'hypothesis>=6'
	@touch $(RT_STAMP)

# Signing keys and bundles v1/v2/v3 + a bad-golden one, for generic-x86_64 and generic-arm64.
$(FIXTURES)/fixtures.json: $(STAMP) tests/runtime_fixtures.py $(wildcard edgeglm/*.py edgeglm/*/*.py compress/*.py devices/*.py devices/profiles/*.toml)
	$(BIN)/python tests/runtime_fixtures.py build $(FIXTURES)

# The LiteRT conversion for real: litert-torch converts, ai-edge-litert runs, ONNX Runtime compares.
# The import check keeps a broken install from passing as "all skipped".
test-litert: $(LT_STAMP)
	@$(LT_BIN)/python -c 'import ai_edge_litert.interpreter, litert_torch' 2>/dev/null || { \
	  echo "make test-litert: litert_torch or ai_edge_litert does not import in $(LT_VENV); rm -rf $(LT_VENV) and retry" >&2; exit 1; }
	@$(LT_BIN)/python -m pytest -q -m litert; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-litert: pytest collected no litert tests" >&2; exit 1; fi; exit $$rc

$(LT_STAMP): pyproject.toml constraints.txt
	@test -x $(LT_BIN)/python || $(PYTHON) -m venv $(LT_VENV)
	$(LT_BIN)/python -m pip install --quiet --upgrade pip
	$(LT_BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(LT_BIN)/python -m pip install --quiet -c constraints.txt -e '.[compress,runtime,litert,dev]'
	@touch $(LT_STAMP)

# Fast suite only, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-accuracy: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py --data $${EDGEGLM_CMAPSS:-../shared/datasets/cmapss} --subset FD001

clean:
	rm -rf $(VENV) $(RT_VENV) $(LT_VENV) build dist *.egg-info .pytest_cache .ruff_cache
