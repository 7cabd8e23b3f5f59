# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo clean

$(BIN)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
