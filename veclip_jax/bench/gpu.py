"""The accelerator benchmark, end to end: `make bench-gpu` (scripts/bench_gpu.sh) runs this in its venv.

    python -m veclip_jax.bench.gpu                  # on a GPU host, in a venv with CUDA jax and torch
    python -m veclip_jax.bench.gpu --smoke          # the CPU path the tests run: tiny sizes, 1 step

Parts, each in a process of its own (an out-of-memory attempt must not poison the next, and jax
and torch must not share a GPU), in this order, within --budget_s (what does not fit is reported
as skipped, never silently dropped):

  b16       our train step (veclip_jax.bench.step), B/16, bf16, cuDNN flash attention, at the
            largest batch of the candidates that compiles and runs (tried largest first)
  open_clip the same B/16 step in open_clip (PyTorch, bf16 autocast, SDPA) at the same batch
            (halved until it fits): the ratio a user cares about
  embed     the eval embedding: both towers' forward, B/16, bf16 (bench.step --mode=embed)
  input     records/s of the training input pipeline on 500x375 JPEGs -> 224 px (bench.input),
            and so the CPU cores one GPU's B/16 step needs
  l14       L/14 at a smaller batch; rn50: the ResNet-50 towers (BatchNorm, no attention)

MFU is against the chip's spec peak (bf16 dense, SPEC_PEAK_TFLOPS, found from the device name);
an unknown chip's peak is measured with a bf16 matmul and said so. FLOPs come from XLA's cost
analysis of the lowered, unrolled step (bench.step --flops=lowered). Output: a table, then one
JSON line {"bench_gpu": ...} with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# bf16 dense tensor-core peak per chip, TFLOP/s (vendor data sheets; sparsity not counted). Matched in
# order as a substring of the device name, so the longer names come first.
SPEC_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)

# Batch candidates per part, tried largest first (GPU; the smoke run uses tiny models and batches).
GPU_PARTS: dict[str, dict[str, Any]] = {
    "b16": {"config": "configs/base.py:B/16", "batches": (2048, 1024, 512, 256, 128)},
    "l14": {"config": "configs/base.py:L/14", "batches": (256, 128, 64)},
    "rn50": {"config": "configs/base.py:RN50", "batches": (1024, 512, 256)},
    "embed": {"config": "configs/base.py:B/16", "batches": (1024, 512)},
}
SMOKE_PARTS: dict[str, dict[str, Any]] = {
    "b16": {"config": "configs/base.py", "batches": (4,)},
    "l14": {"config": "configs/base.py", "batches": (2,)},
    "rn50": {"config": "configs/base.py:RN-tiny", "batches": (4,)},
    "embed": {"config": "configs/base.py", "batches": (4,)},
}
# The order they run in: what the budget may cut comes last.
ALL_PARTS = ("b16", "open_clip", "embed", "input", "l14", "rn50")
SMOKE_DEFAULT = ("b16", "open_clip", "embed", "input")

_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|OutOfMemoryError|failed to allocate", re.I)


class OutOfMemory(Exception):
    """A batch that does not fit (compile or run): the search tries the next smaller one."""


class PartFailed(Exception):
    """A part that failed for another reason (its output's tail is the message)."""


def spec_peak_tflops(device_name: str) -> float | None:
    """The chip's bf16 dense peak from SPEC_PEAK_TFLOPS, or None for a chip not in the table."""
    for key, peak in SPEC_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def gpu_name() -> tuple[str, float | None]:
    """(the first GPU's name, its memory in GiB) from nvidia-smi; ("", None) without one."""
    if not shutil.which("nvidia-smi"):
        return "", None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "", None
    name, _, mib = out.splitlines()[0].partition(",")
    return name.strip(), (float(mib) / 1024 if mib.strip() else None)


def search_batch(
    batches: Sequence[int], attempt: Callable[[int], dict[str, Any]]
) -> tuple[dict[str, Any], list[list[Any]]]:
    """The first of `batches` (largest first) that `attempt` runs without OutOfMemory: (its result,
    [[batch, "oom"], ...] of the batches that did not fit). Raises OutOfMemory when none fits."""
    tried: list[list[Any]] = []
    for b in sorted(batches, reverse=True):
        try:
            return attempt(b), tried
        except OutOfMemory:
            tried.append([b, "oom"])
    raise OutOfMemory(f"no batch of {list(batches)} fits")


class Runner:
    """Runs the parts' processes within one deadline, with the platform's environment."""

    def __init__(self, python: str, platform: str, budget_s: float, log: Any = sys.stderr):
        self.python, self.platform, self.log = python, platform, log
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def env(self, jax_part: bool) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if jax_part:
            env["JAX_PLATFORMS"] = "cuda" if self.platform == "gpu" else "cpu"  # no silent CPU fallback
            if self.platform == "gpu":
                env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the search probes the memory
        return env

    def run(self, args: list[str], jax_part: bool, cap_s: float) -> str:
        """The module's output; OutOfMemory / PartFailed / TimeoutError otherwise."""
        if self.left() < 10:
            raise TimeoutError("no time left in --budget_s")
        timeout = min(cap_s, self.left())
        print(f"  $ python {' '.join(args)}", file=self.log, flush=True)
        # A session of its own: on a timeout its whole process group goes (bench.torch_step runs open_clip
        # in a grandchild, which must not live on holding GPU memory while the next part runs).
        env = self.env(jax_part)
        proc = subprocess.Popen([self.python, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TimeoutError(f"ran past {timeout:.0f} s") from None
        text = stdout + stderr
        if proc.returncode:
            if _OOM.search(text):
                raise OutOfMemory(text[-500:])
            raise PartFailed(text[-1500:])
        return stdout


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise PartFailed(f"no JSON line in:\n{text[-1500:]}")


def _report_fields(text: str) -> dict[str, str]:
    """bench.torch_step's "name   value" lines."""
    return {m[1]: m[2] for m in re.finditer(r"^(\w[\w ()/]*?)\s{2,}(.+)$", text, re.M)}


def jax_part(runner: Runner, spec: dict[str, Any], mode: str, peak: float | None, steps: int,
             smoke: bool) -> dict[str, Any]:  # fmt: skip
    """bench.step at the largest batch that fits; cuDNN attention on a GPU (XLA's if cuDNN refuses)."""
    attention = ["cudnn", "xla"] if runner.platform == "gpu" else ["xla"]

    def attempt(b: int) -> dict[str, Any]:
        for i, impl in enumerate(attention):
            args = ["-m", "veclip_jax.bench.step", f"--config={spec['config']}", f"--config.batch_size={b}",
                    "--config.model.dtype=bfloat16", f"--config.model.attention={impl}", f"--steps={steps}",
                    f"--mode={mode}", "--json", "--flops=lowered"]  # fmt: skip
            args += [f"--peak_tflops={peak}"] if peak else ["--peak_dtype=bfloat16"]
            try:
                out = _last_json(runner.run(args, jax_part=True, cap_s=120 if smoke else 300))
            except PartFailed as e:
                if i + 1 < len(attention) and "cudnn" in str(e).lower():
                    print(f"  cuDNN attention failed at batch {b}: retrying with XLA's", file=runner.log)
                    continue
                raise
            return out
        raise AssertionError("unreachable")

    result, tried = search_batch(spec["batches"], attempt)
    return result | {"oom_batches": [b for b, _ in tried]}


def open_clip_part(runner: Runner, config: str, batch: int, steps: int) -> dict[str, Any]:
    """open_clip's B/16 step (bf16 autocast, SDPA) at `batch`, halved until it fits."""
    device = "cuda" if runner.platform == "gpu" else "cpu"

    def attempt(b: int) -> dict[str, Any]:
        args = ["-m", "veclip_jax.bench.torch_step", f"--config={config}", f"--config.batch_size={b}",
                "--peer=open_clip", f"--device={device}", "--precision=bf16", f"--steps={steps}"]  # fmt: skip
        f = _report_fields(runner.run(args, jax_part=False, cap_s=300))
        step_ms = float(f["step (median)"].split()[0])
        memory = f.get("peak memory")
        return {"mode": "train", "model": f["model"], "batch": b, "step_ms": step_ms,
                "images_per_s": float(f["images/s"]), "loss": float(f["loss"]),
                "peak_memory_bytes": float(memory.split()[0]) * 2**30 if memory else None}  # fmt: skip

    batches = [batch // 2**k for k in range(4) if batch // 2**k >= 1]
    result, tried = search_batch(batches, attempt)
    return result | {"oom_batches": [b for b, _ in tried]}


def input_part(runner: Runner, smoke: bool, cache_dir: str | None) -> dict[str, Any]:
    """bench.input on the 500x375 photos: decode+crop on one thread, and the pipeline in processes."""
    workers = "0" if smoke else f"1,{max(1, min(8, (os.cpu_count() or 2) - 2))}"
    args = ["-m", "veclip_jax.bench.input", "--datasets=photo", "--decoders=simplejpeg",
            f"--workers={workers}", f"--seconds={0.5 if smoke else 3}",
            f"--num_photos={16 if smoke else 256}"]  # fmt: skip
    args += [f"--cache_dir={cache_dir}"] if cache_dir else []
    out = runner.run(args, jax_part=False, cap_s=120 if smoke else 180)
    rows = {}
    for line in out.splitlines():
        m = re.match(r"photo 500x375 -> 224px\s+simplejpeg\s+(.+?)\s+(\d+)$", line.strip())
        if m:
            rows[m[1].strip()] = float(m[2])
    if not rows:
        raise PartFailed(f"no photo rows in bench.input's output:\n{out[-1500:]}")
    return {"mode": "input", "records_per_s": rows}


def _row(name: str, r: dict[str, Any] | None, why: str = "") -> str:
    if r is None:
        return f"{name:<18} {'':>6} {'':>6} {'':>10} {'':>9} {'':>6} {'':>9}  {why}"
    mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-"
    mem = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r.get("peak_memory_bytes") else "-"
    notes = [f"attention {r['attention']}"] if r.get("attention") else []
    notes += [f"OOM at {r['oom_batches']}"] if r.get("oom_batches") else []
    model = str(r.get("model", ""))[:6] if not str(r.get("model", "")).startswith("open_clip") else "B/16"
    return (f"{name:<18} {model:>6} {r['batch']:>6} {r['images_per_s']:>10.1f} {r['step_ms']:>9.1f} {mfu:>6} "
            f"{mem:>9}  {', '.join(notes)}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the parts, prints the table and the JSON line; 0 when the B/16 step ran."""
    p = argparse.ArgumentParser(prog="python -m veclip_jax.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the CPU path: tiny models, 1 step, no GPU needed")
    p.add_argument("--parts", default=None, help=f"comma-separated of {','.join(ALL_PARTS)} (default: all; "
                   f"smoke: {','.join(SMOKE_DEFAULT)})")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10; smoke 1)")
    p.add_argument("--budget_s", type=float, default=420.0, help="the whole benchmark's time limit")
    p.add_argument("--cache_dir", default=None, help="demo data cache for the input part's tokenizer")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the chip peak (default: SPEC_PEAK_TFLOPS by name; smoke: nominal 1)")  # fmt: skip
    args = p.parse_args(argv)
    t0 = time.monotonic()
    parts = args.parts.split(",") if args.parts else list(SMOKE_DEFAULT if args.smoke else ALL_PARTS)
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        print(f"error: --parts: unknown {sorted(unknown)}; known: {', '.join(ALL_PARTS)}", file=sys.stderr)
        return 2
    steps = args.steps or (1 if args.smoke else 10)
    platform = "cpu" if args.smoke else "gpu"
    specs = SMOKE_PARTS if args.smoke else GPU_PARTS
    name, memory_gib = gpu_name() if platform == "gpu" else ("cpu", None)
    if platform == "gpu" and not name:
        print("error: no GPU (nvidia-smi found none); the CPU path is --smoke", file=sys.stderr)
        return 2
    peak = args.peak_tflops or (spec_peak_tflops(name) if platform == "gpu" else 1.0)  # smoke: nominal
    runner = Runner(sys.executable, platform, args.budget_s)
    what = "given" if args.peak_tflops else "nominal (smoke)" if args.smoke else "spec, bf16 dense"
    print(f"device: {name}{f' ({memory_gib:.0f} GiB)' if memory_gib else ''}; peak: "
          f"{f'{peak:g} TFLOP/s ({what})' if peak else 'unknown chip: measured by a bf16 matmul'}",
          flush=True)  # fmt: skip

    results: dict[str, dict[str, Any] | None] = {}
    why: dict[str, str] = {}
    for part in parts:
        print(f"[{time.monotonic() - t0:5.0f} s] {part}", file=sys.stderr, flush=True)
        try:
            if part == "open_clip":
                if (b16 := results.get("b16")) is None:
                    raise PartFailed("needs the b16 part's batch")
                if args.smoke:
                    sys.path.insert(0, os.path.join(ROOT, "tests"))
                    from openclip_ref import available

                    if reason := available():
                        raise PartFailed(f"skipped: {reason}")
                results[part] = open_clip_part(runner, specs["b16"]["config"], b16["batch"], steps)
            elif part == "input":
                results[part] = input_part(runner, args.smoke, args.cache_dir)
            else:
                mode = "embed" if part == "embed" else "train"
                results[part] = jax_part(runner, specs[part], mode, peak, steps, args.smoke)
        except (OutOfMemory, PartFailed, TimeoutError) as e:
            results[part] = None
            why[part] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            print(f"  {part}: {e}", file=sys.stderr, flush=True)

    print(f"\n{'part':<18} {'model':>6} {'batch':>6} {'images/s':>10} {'step ms':>9} {'MFU %':>6} "
          f"{'peak GiB':>9}  notes")  # fmt: skip
    labels = {"b16": "train (ours)", "open_clip": "train (open_clip)", "l14": "train (ours)",
              "rn50": "train (ours)", "embed": "eval embedding"}  # fmt: skip
    for part in parts:
        if part != "input":
            print(_row(labels[part], results.get(part), why.get(part, "")))
    ratio = None
    if results.get("b16") and results.get("open_clip"):
        ratio = results["b16"]["images_per_s"] / results["open_clip"]["images_per_s"]
        same = results["b16"]["batch"] == results["open_clip"]["batch"]
        print(f"\nB/16 train step, ours / open_clip: {ratio:.2f}x images/s"
              f"{'' if same else ' (at different batches: open_clip did not fit ours)'}")  # fmt: skip
    if "input" in parts:
        if results.get("input"):
            rows = results["input"]["records_per_s"]
            print("\ninput pipeline, 500x375 JPEG -> 224 px, records/s: "
                  + ", ".join(f"{k}: {v:.0f}" for k, v in rows.items()))  # fmt: skip
            one = rows.get("1 worker process") or rows.get("decode+crop only, 1 thread")
            if one and results.get("b16"):
                cores = results["b16"]["images_per_s"] / one
                print(f"  cores to feed the B/16 step at {results['b16']['images_per_s']:.0f} images/s: "
                      f"about {cores:.1f} (at {one:.0f} records/s per core)")  # fmt: skip
                results["input"]["cores_for_b16"] = round(cores, 1)
        else:
            print(f"\ninput pipeline: {why.get('input', '')}")
    summary = {"device": name, "memory_gib": memory_gib, "spec_peak_tflops": peak, "platform": platform,
               "smoke": args.smoke, "parts": results, "skipped": why,
               "b16_vs_open_clip": round(ratio, 3) if ratio else None,
               "wall_s": round(time.monotonic() - t0, 1)}  # fmt: skip
    print(json.dumps({"bench_gpu": summary}))
    return 0 if results.get("b16") else 1


if __name__ == "__main__":
    sys.exit(main())
