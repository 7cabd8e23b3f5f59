# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo demo-table bench-gpu clean

# The pinned requirements, then the package itself in editable mode (no build isolation: no download).
$(BIN)/.installed: requirements.txt requirements-tpu.txt requirements-nodeps.txt requirements-openclip.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip install -q --no-deps --target $(VENV)/libtpu -r requirements-tpu.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps --target $(VENV)/openclip -r requirements-openclip.txt
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check .

# Two test processes (pytest-xdist), each taking a whole test file at a time (its module fixtures are
# built once): most tests keep one core busy (XLA's compiles, Python), so on the 2-core machine two
# processes run the suite in 21 min instead of 31. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: setup lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The main job: train configs/demo.py on the embedded demo data (generated on
# first use), then print its evaluation table. Rerunning resumes (or, when
# finished, only prints the table); `rm -rf workdir/demo` starts over.
demo: setup
	$(BIN)/python launch/train.py --config=configs/demo.py --workdir=workdir/demo

# The README's demo table: the three caption mixes (AltText only, the VeCLIP
# mix, VeCap only), trained one after the other, side by side.
demo-table: setup
	for v in alttext mixed vecap; do \
	  $(BIN)/python launch/train.py --config=configs/demo.py:$$v --workdir=workdir/demo_$$v || exit 1; \
	done
	$(BIN)/python launch/report.py workdir/demo_alttext workdir/demo_mixed workdir/demo_vecap

# The accelerator benchmark (one GPU, about 7 minutes once its own venv .venv/bench is installed):
# B/16, L/14 and RN50 steps, eval embedding, input pipeline, open_clip's B/16 step for the ratio.
# scripts/bench_gpu.sh says how to pre-stage wheels for a host without internet.
bench-gpu:
	bash scripts/bench_gpu.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .cache
