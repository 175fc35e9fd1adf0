# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080

.PHONY: run test system-packages lint typecheck pytest soak bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: set up and start the receiver on 127.0.0.1 with the embedded development config
run: $(STAMP)
	$(BIN)/episode-receiver serve --dev --port $(PORT)

## test: install missing system packages, set up, then lint, type-check and run the tests
# Prerequisites run left to right: the system packages (python3-venv among them) first.
test: system-packages $(STAMP) lint typecheck pytest

## system-packages: the Debian packages the tests need (chromium, zstd, ...), if missing
system-packages:
	PYTHON=$(PYTHON) scripts/setup-system.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -m "not soak"

## soak: the long variants of the reliability tests
soak: $(STAMP)
	$(BIN)/pytest -m soak

## bench: the benchmark suite, each figure next to a baseline from the same run (not part
## of make test); ARGS=--quick for tiny sizes, ARGS="--only upload,nginx" for some figures
bench: system-packages $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
