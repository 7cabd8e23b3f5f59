"""Micro-benchmark of the train step: compile time, step time, images/s, MFU.

  python -m veclip_jax.bench.step --config=configs/base.py:B/16 --config.batch_size=8
  python -m veclip_jax.bench.step --config=configs/base.py --config.mesh.fsdp=2 --peak_tflops=989
  python -m veclip_jax.bench.step --config=configs/base.py:RN50 --config.batch_size=8  # any MODEL_SIZES key

Model FLOPs per step come from XLA's cost analysis of the step compiled with
the layer scans unrolled (XLA counts a loop body once; the timed step is the
scanned one), per device times the number of devices: forward, backward and
optimizer, as compiled. MFU = those FLOPs / step time / peak, where the peak
is --peak_tflops (for the whole mesh) or, when not given, measured here with
a large float32 (or --peak_dtype) matmul on every device. Random inputs: this
times the step, not the input pipeline (veclip_jax.bench.input does that).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from veclip_jax import defaults
from veclip_jax.objectives.model import param_count
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.train.assembly import Assembly, assemble, synthetic_batch

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (default: veclip_jax/defaults.py, the tiny model)."
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of the whole mesh; 0 = measure with a matmul.")
_PEAK_DTYPE = flags.DEFINE_string("peak_dtype", "float32", "dtype of the peak-measuring matmul.")


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


def step_flops(assembly: Assembly, state, batch) -> float:
    """FLOPs of one step over the whole mesh, counted on the same step with the layer scans unrolled."""
    unrolled = assemble(assembly.config, assembly.mesh, objective=assembly.objective, unroll=True)
    cost = unrolled.step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) * assembly.mesh.size


def main(_: list[str]) -> None:
    config = _CONFIG.value or defaults.get_config()
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
    flops = step_flops(assembly, state, batch)

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


if __name__ == "__main__":
    app.run(main)
