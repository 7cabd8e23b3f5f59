#!/usr/bin/env bash
# The accelerator benchmark in one command: `make bench-gpu` (or `bash scripts/bench_gpu.sh [ARGS]`).
#
# On a GPU host it makes its own venv (.venv/bench, with the system's site packages visible, so a
# host that ships jax/torch/CUDA reuses them), installs the project's pins with the CUDA jax that
# matches them (jax[cudaNN]==<the jax pin>: jaxlib, jax-cudaNN-plugin and jax-cudaNN-pjrt of that
# version, the CUDA libraries as pip packages), torchvision and open_clip for the PyTorch peer, then
# runs `python -m veclip_jax.bench.gpu` (veclip_jax/bench/gpu.py says what it measures): B/16 at
# the largest batch that fits (bf16, cuDNN flash attention), the same step in open_clip (bf16
# autocast, SDPA), L/14, RN50, the eval embedding and the input pipeline; a table, then one JSON
# line. About 7 minutes once the venv exists (--budget_s, default 420, bounds it); the first run
# also installs (a few GB of CUDA wheels).
#
# CUDA 12 or 13: the torch pin (2.13.0) is built for CUDA 13 on PyPI, so the jax plugin is the
# CUDA 13 one when the driver supports it (nvidia-smi's "CUDA Version"), else CUDA 12 (then the
# open_clip peer needs a CUDA 12 torch: BENCH_TORCH_INDEX). BENCH_CUDA=12|13 forces one.
#
# The GPU host may have no internet. Pre-stage the wheels on a machine that has it (same OS,
# architecture and Python 3.11), carry the folder over, and point BENCH_WHEELS at it: pip then
# installs with --no-index from there.
#     pip download -d wheels -r requirements.txt "jax[cuda13]==0.10.2" torchvision==0.28.0
#     pip download -d wheels --no-deps -r requirements-nodeps.txt
#     BENCH_WHEELS=$PWD/wheels make bench-gpu
#
# Environment:
#   BENCH_PLATFORM=cpu  the CPU path the tests run: this project's .venv (or BENCH_PYTHON), tiny
#                       models, 1 step, nothing installed (python -m veclip_jax.bench.gpu --smoke)
#   BENCH_VENV          the bench venv (default .venv/bench); BENCH_PYTHON: its interpreter (3.11)
#   BENCH_WHEELS        a folder of pre-staged wheels (offline install)
#   BENCH_CUDA          12 or 13 (default: from the driver)
#   BENCH_TORCH_INDEX   an index URL for the CUDA torch (e.g. PyTorch's cu128 wheels)
# Arguments go to veclip_jax.bench.gpu (--parts=b16,open_clip,..., --budget_s, --steps).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "${BENCH_PLATFORM:-gpu}" = "cpu" ]; then
  PY="${BENCH_PYTHON:-}"
  [ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
  exec "$PY" -m veclip_jax.bench.gpu --smoke "$@"
fi

pin() { sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$2" | head -1; }
JAX_PIN="$(pin jax requirements.txt)"
TORCH_PIN="$(pin torch requirements.txt)"
TV_PIN="$(pin torchvision requirements-openclip.txt)"
CUDA="${BENCH_CUDA:-}"
if [ -z "$CUDA" ]; then
  driver_cuda="$({ nvidia-smi 2>/dev/null || true; } | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)"
  [ -n "$driver_cuda" ] || { echo "error: nvidia-smi finds no GPU; the CPU path is BENCH_PLATFORM=cpu" >&2; exit 2; }
  CUDA=$([ "$driver_cuda" -ge 13 ] && echo 13 || echo 12)
fi
VENV="${BENCH_VENV:-$ROOT/.venv/bench}"
STAMP="$VENV/.installed-jax$JAX_PIN-cuda$CUDA-torch$TORCH_PIN"
PIP_SRC=()
[ -n "${BENCH_WHEELS:-}" ] && PIP_SRC=(--no-index --find-links "$BENCH_WHEELS")

if [ ! -f "$STAMP" ]; then
  echo "bench venv $VENV: jax[cuda$CUDA]==$JAX_PIN, torch==$TORCH_PIN (first run: a few minutes)" >&2
  "${BENCH_PYTHON:-$(command -v python3.11 || command -v python3)}" -m venv --system-site-packages "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q "${PIP_SRC[@]}")
  # The pins without torch (installed next, from where a CUDA build comes), with the CUDA jax.
  grep -v '^torch==' requirements.txt > "$VENV/requirements-bench.txt"
  "${PIP[@]}" -r "$VENV/requirements-bench.txt" "jax[cuda$CUDA]==$JAX_PIN"
  TORCH_SRC=()
  [ -n "${BENCH_TORCH_INDEX:-}" ] && TORCH_SRC=(--index-url "$BENCH_TORCH_INDEX")
  "${PIP[@]}" "${TORCH_SRC[@]}" "torch==$TORCH_PIN" "torchvision==$TV_PIN"
  "${PIP[@]}" --no-deps -r requirements-nodeps.txt
  touch "$STAMP"
fi
BPY="$VENV/bin/python"
"$BPY" - <<'PY' || { echo "error: jax in $VENV sees no GPU (driver, or the CUDA plugin: BENCH_CUDA)" >&2; exit 2; }
import jax
assert jax.default_backend() == "gpu", jax.devices()
print("jax", jax.__version__, jax.devices())
PY
"$BPY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
  || echo "warning: torch in $VENV has no CUDA (a CPU wheel shadowed it?): the open_clip part will fail; set BENCH_WHEELS or BENCH_TORCH_INDEX" >&2
exec "$BPY" -m veclip_jax.bench.gpu "$@"
