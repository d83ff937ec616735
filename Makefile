# echo-scp: `make run` starts the daemon on its defaults, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
# echo-scp with its runtime dependencies only, built as the image builds it: what the benchmark runs.
RUNTIME := $(VENV)/runtime
RUNTIME_STAMP := $(RUNTIME)/.installed

.PHONY: run test lint typecheck matrix check-config bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The runtime dependencies only: a first `make run` should not wait for the test toolchain.
$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/echo-scp serve --config config/echo-scp.toml

check-config: $(STAMP)
	$(BIN)/echo-scp check-config --config config/echo-scp.toml

LINT_PATHS := $(wildcard service tests bench)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

# The pynetdicom contract and a process smoke test on each older pynetdicom 3.0.x (about 30 s).
matrix: $(STAMP)
	VENV=$(VENV) PYTHON=$(PYTHON) bash .ci/pynetdicom-matrix

test: $(STAMP) lint typecheck matrix
	$(BIN)/python -m pytest

# Built by the image's own recipe (a wheel, not editable), again whenever the sources change.
$(RUNTIME_STAMP): pyproject.toml deploy/runtime-venv.sh $(shell find service/echo_scp -name '*.py')
	PIP_QUIET=1 sh deploy/runtime-venv.sh $(PYTHON) $(RUNTIME) .
	touch $(RUNTIME_STAMP)

bench: $(STAMP) $(RUNTIME_STAMP)
	$(BIN)/python bench/run.py --venv $(RUNTIME)

clean:
	rm -rf $(VENV) build *.egg-info service/*.egg-info
