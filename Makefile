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

# Until the training loop lands (issue #4): generate the demo data, then time
# the train step of the tiny model on this machine.
demo: setup
	$(BIN)/python -m veclip_jax.data.demo
	$(BIN)/python -m veclip_jax.bench.step --config=configs/base.py

clean:
	rm -rf $(VENV) .pytest_cache
