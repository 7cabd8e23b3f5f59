"""Micro-benchmark of the train step: compile time, step time, images/s, MFU.

  python -m veclip_jax.bench.step --config=configs/base.py:B/16 --config.batch_size=8
  python -m veclip_jax.bench.step --config=configs/base.py --config.mesh.fsdp=2 --peak_tflops=989
  python -m veclip_jax.bench.step --config=configs/base.py:RN50 --config.batch_size=8  # any MODEL_SIZES key
  python -m veclip_jax.bench.step --config=configs/base.py:B/16 --mode=embed --json  # eval embedding

Model FLOPs per step come from XLA's cost analysis of the step compiled with
the layer scans unrolled (XLA counts a loop body once; the timed step is the
scanned one), per device times the number of devices: forward, backward and
optimizer, as compiled. MFU = those FLOPs / step time / peak, where the peak
is --peak_tflops (for the whole mesh) or, when not given, measured here with
a large float32 (or --peak_dtype) matmul on every device. Random inputs: this
times the step, not the input pipeline (veclip_jax.bench.input does that).

--flops=lowered counts the unrolled step's FLOPs from its lowered (unoptimised)
HLO instead of compiling it: the same matmuls within a fraction of a percent,
without a second full compile (minutes for a big model: scripts/bench_gpu.sh
uses it). --mode=embed times the evaluation's embedding instead (both towers'
forward, no gradient: images/s of `encode_image` + `encode_text` on a batch).
--json adds one JSON line of every figure, with the device's peak memory
(`memory_stats()["peak_bytes_in_use"]`, null where the backend has none).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from veclip_jax import defaults
from veclip_jax.models.clip import build_model
from veclip_jax.objectives.model import param_count
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.train.assembly import Assembly, assemble, synthetic_batch

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (default: veclip_jax/defaults.py, the tiny model)."
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of the whole mesh; 0 = measure with a matmul.")
_PEAK_DTYPE = flags.DEFINE_string("peak_dtype", "float32", "dtype of the peak-measuring matmul.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "embed"], "The train step, or the eval embedding.")
_FLOPS = flags.DEFINE_enum(
    "flops", "compiled", ["compiled", "lowered"], "FLOPs from the compiled or the lowered unrolled step."
)
_JSON = flags.DEFINE_bool("json", False, "Also print one JSON line of the figures.")


def measure_peak_tflops(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """Achieved TFLOP/s of an n x n matmul on every device at once (a practical peak)."""
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.P("d"))
    a = jax.device_put(jnp.ones((len(jax.devices()), n, n), dtype), sharding)
    matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = matmul(a)
    out.block_until_ready()
    elapsed = (time.perf_counter() - start) / reps
    return 2 * n**3 * len(jax.devices()) / elapsed / 1e12


def _flops_of(stage: Any) -> float:
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0))


def step_flops(assembly: Assembly, state, batch, how: str = "compiled") -> float:
    """FLOPs of one step over the whole mesh, counted on the same step with the layer scans unrolled.

    `how`: "compiled" (per device, as compiled) or "lowered" (the unoptimised HLO of the whole
    program: no compile)."""
    unrolled = assemble(assembly.config, assembly.mesh, objective=assembly.objective, unroll=True)
    lowered = unrolled.step.lower(state, batch)
    if how == "lowered":
        return _flops_of(lowered)
    return _flops_of(lowered.compile()) * assembly.mesh.size


def peak_memory_bytes() -> int | None:
    """The most device memory in use so far on the first local device (None: not reported here)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 (a backend without the call)
        return None
    return stats.get("peak_bytes_in_use")


def _timed(fn: Any, *args: Any, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of fn(*args) after one warm-up call (outputs awaited)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def embed_main(config: Any) -> dict[str, Any]:
    """The eval embedding: both towers' forward on a random batch (the input dtype the model takes)."""
    model = build_model(config.model)
    b, v, t = config.batch_size, config.model.vision, config.model.text
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (b, v.image_size, v.image_size, 3)).astype(np.uint8))
    tokens = rng.integers(3, t.vocab_size, (b, t.context_length)).astype(np.int32)
    tokens[:, -1] = t.eos_id
    tokens = jnp.asarray(tokens)
    variables = jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1])

    def embed(variables: Any, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return (model.apply(variables, images, method=model.encode_image),
                model.apply(variables, tokens, method=model.encode_text))  # fmt: skip

    start = time.perf_counter()
    lowered = jax.jit(embed).lower(variables, images, tokens)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    times = _timed(compiled, variables, images, tokens, steps=_STEPS.value)
    step_s = float(np.median(times))
    return {"mode": "embed", "model": config.model.size, "dtype": config.model.dtype,
            "attention": config.model.attention, "batch": b, "compile_s": round(compile_s, 2),
            "step_ms": round(step_s * 1e3, 3), "images_per_s": round(b / step_s, 1),
            "flops": _flops_of(lowered), "peak_memory_bytes": peak_memory_bytes()}  # fmt: skip


def _device() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "devices": len(jax.devices())}


def main(_: list[str]) -> None:
    config = _CONFIG.value or defaults.get_config()
    if _MODE.value == "embed":
        out = embed_main(config) | _device()
        peak = _PEAK.value or None
        if peak and out["flops"]:
            out["mfu"] = round(out["flops"] / (out["step_ms"] / 1e3) / 1e12 / peak, 4)
        print(f"eval embedding   {out['model']} {out['dtype']}, batch {out['batch']}: "
              f"{out['images_per_s']:.1f} images/s ({out['step_ms']:.1f} ms)")  # fmt: skip
        if _JSON.value:
            print(json.dumps(out))
        return
    mesh = make_mesh(config.mesh)
    assembly = assemble(config, mesh)  # the training loop's own step

    start = time.perf_counter()
    state = assembly.init_state(jax.random.key(config.seed))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start

    b = config.batch_size
    shardings = {k: x.sharding for k, x in assembly.abstract_batch().items()}
    batch = {k: jax.device_put(x, shardings[k]) for k, x in synthetic_batch(assembly).items()}
    start = time.perf_counter()
    compiled = assembly.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = step_flops(assembly, state, batch, _FLOPS.value)

    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))

    peak = _PEAK.value or measure_peak_tflops(_PEAK_DTYPE.value)
    achieved = flops / step_s / 1e12
    size = f"{param_count(assembly.model) / 1e6:.1f}M params, {config.model.dtype}"
    print(f"model            {config.model.size}  ({size})")
    print(f"mesh             {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} device(s)")
    print(f"global batch     {b}  (grad_accum_steps={config.optim.grad_accum_steps})")
    print(f"init             {init_s:.2f} s")
    print(f"compile          {compile_s:.2f} s")
    print(f"step (median)    {step_s * 1e3:.1f} ms over {len(times)} steps (min {min(times) * 1e3:.1f})")
    print(f"images/s         {b / step_s:.1f}")
    print(f"FLOPs/step       {flops / 1e9:.2f} GFLOP (XLA cost analysis)")
    print(f"achieved         {achieved:.3f} TFLOP/s")
    print(f"peak             {peak:.3f} TFLOP/s ({'given' if _PEAK.value else 'measured matmul'})")
    print(f"MFU              {100 * achieved / peak:.1f} %")
    print(f"loss             {float(metrics['loss']):.4f}")
    memory = peak_memory_bytes()
    if memory is not None:
        print(f"peak memory      {memory / 2**30:.2f} GiB (device 0)")
    if _JSON.value:
        out = {"mode": "train", "model": config.model.size, "dtype": config.model.dtype,
               "attention": config.model.attention, "remat": config.model.remat, "batch": b,
               "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 3),
               "images_per_s": round(b / step_s, 1), "flops": flops, "flops_from": _FLOPS.value,
               "achieved_tflops": round(achieved, 3), "peak_tflops": peak,
               "peak_from": "given" if _PEAK.value else "measured matmul", "mfu": round(achieved / peak, 4),
               "peak_memory_bytes": memory, "loss": float(metrics["loss"])}  # fmt: skip
        print(json.dumps(out | _device()))


if __name__ == "__main__":
    app.run(main)
