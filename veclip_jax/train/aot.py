"""Compile the real sharded train step for a TPU pod on a CPU host (maxtext's train_compile idea).

libtpu gives compile-only TPU devices for a named topology (`v5p:4x4x8`) on
any host; the step is lowered for abstract inputs placed on a mesh of them
and compiled by the TPU compiler. XLA's memory analysis then says what each
chip holds (arguments, temporaries, code), before a pod is booked.

libtpu is kept out of the CPU runs (installed, it makes JAX probe for a TPU at
every start-up): `make setup` installs it into `.venv/libtpu/`, and
`use_libtpu()` points JAX at it (TPU_LIBRARY_PATH) just before compiling.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from veclip_jax.errors import UserError
from veclip_jax.objectives.model import param_count
from veclip_jax.parallel.hardware import Accelerator, devices_per_chip, parse_hardware
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.train.assembly import assemble

LIBTPU_PIN = "libtpu==0.0.42.*"  # what jax[tpu]==0.10.2 pins
# Quiet, fast libtpu start-up on a host that is not a TPU VM (no metadata server queries).
_COMPILE_ONLY_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # compile-only: several compiles may run at once (no chips to share)
}


def find_libtpu() -> str:
    """The libtpu.so to compile with: $TPU_LIBRARY_PATH, VENV/libtpu/, or an installed libtpu package."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.environ["TPU_LIBRARY_PATH"]
    side = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
    if os.path.exists(side):
        return side
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so")
        if os.path.exists(path):
            return path
    raise UserError(
        f"libtpu is not installed: pip install --target {os.path.join(sys.prefix, 'libtpu')} '{LIBTPU_PIN}' "
        "(make setup does this)"
    )


def use_libtpu() -> None:
    """Points JAX at libtpu for compile-only TPU devices; call before the first TPU query."""
    os.environ["TPU_LIBRARY_PATH"] = find_libtpu()
    for k, v in _COMPILE_ONLY_ENV.items():
        os.environ.setdefault(k, v)


def topology_devices(topology: str, slices: int = 1) -> list[Any]:
    """Compile-only devices of a TPU topology, e.g. "v5p:4x4x8" (generation:shape), per slice x slices."""
    from jax.experimental import topologies

    use_libtpu()
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=slices)
    except Exception as e:  # libtpu's INVALID_ARGUMENT for a name it does not know
        raise UserError(f"--topology={topology}: {str(e).splitlines()[0]} (names: v4:8x8x8, v5p:4x4x8, "
                        "v5e:16x16, v6e:16x16)") from None  # fmt: skip
    return list(desc.devices)


def resnet_flops_per_image(v: Any, embed_dim: int) -> float:
    """Forward FLOPs of CLIP's ModifiedResNet on one image (models/resnet.py): its convolutions
    (2 x multiply-adds, as XLA counts them) and the attention pool, which queries with the mean token
    only (open_clip's profile, 12.22 GFLOPs for RN50, also counts the 49 other queries: 11.59 here)."""
    side, w, half = v.image_size // 2, v.width, v.width // 2
    flops = 2 * side * side * 9 * (3 * half + half * half + half * w)  # the stem's three 3x3 convolutions
    side //= 2  # its 2x2 average pool
    channels = w
    for i, blocks in enumerate(v.resnet_layers):
        planes = w * 2**i
        for j in range(blocks):
            out = side // (2 if i > 0 and j == 0 else 1)  # block0 of stages 2-4 pools before conv3
            flops += 2 * side * side * (channels * planes + 9 * planes * planes)  # conv1, conv2
            flops += 2 * out * out * planes * 4 * planes  # conv3
            if out != side or channels != 4 * planes:
                flops += 2 * out * out * channels * 4 * planes  # the shortcut's 1x1 convolution
            channels, side = 4 * planes, out
    tokens = side * side + 1
    pool = 2 * channels * channels * (1 + 2 * tokens) + 4 * tokens * channels  # q (1 row), k, v; attention
    return flops + pool + 2 * channels * embed_dim  # c_proj


def model_flops_per_example(model_cfg: Any) -> float:
    """Forward matmul FLOPs of one image-text pair (the convention behind MFU: no remat, no softmax)."""

    def tower(tokens: int, width: int, layers: int, mlp: int) -> float:
        per_layer = 2 * tokens * width * (4 * width + 2 * mlp) + 4 * tokens * tokens * width
        return layers * per_layer

    t, e = model_cfg.text, model_cfg.embed_dim
    text = tower(t.context_length, t.width, t.layers, t.mlp_dim) + 2 * t.width * e
    return float(image_flops(model_cfg) + text)


def image_flops(model_cfg: Any) -> float:
    """Forward FLOPs of the image tower on one image, to the joint embedding."""
    v, e = model_cfg.vision, model_cfg.embed_dim
    if v.get("type", "vit") == "resnet":
        return resnet_flops_per_image(v, e)
    patches = (v.image_size // v.patch_size) ** 2
    per_layer = 2 * (patches + 1) * v.width * (4 * v.width + 2 * v.mlp_dim) + 4 * (patches + 1) ** 2 * v.width
    return float(v.layers * per_layer + 2 * patches * v.patch_size**2 * 3 * v.width + 2 * v.width * e)


def tower_passes(objective_cfg: Any) -> tuple[int, int]:
    """(image, text) tower passes per example of the config's objective: SLIP runs the image tower
    on the crop and two views, DeCLIP on two views and the text tower on the masked and EDA captions."""
    from veclip_jax.batch import TEXT_INPUTS
    from veclip_jax.objectives import make_objective

    objective = make_objective(objective_cfg)
    has = lambda prefix: any(n.startswith(prefix + "_") and n != "text_valid" for n in objective.needs)
    return has("image") + objective.views * has("view"), sum(has(p) for p in TEXT_INPUTS)


def train_flops_per_step(config: ml_collections.ConfigDict) -> float:
    """Model FLOPs of one optimizer step: 3x forward (backward is two matmuls per forward one) of each
    tower pass the objective makes, and the global-batch similarity logits (B x B x D, both
    directions). Objective heads (SLIP's MLP, DeCLIP's MLM logits, FILIP's token similarities) are
    not counted."""
    b, e, m = config.batch_size, config.model.embed_dim, config.model
    images, texts = tower_passes(config.get("objective"))
    forward = images * image_flops(m) + texts * (model_flops_per_example(m) - image_flops(m))
    return 3 * (b * forward + 2 * 2 * b * b * e)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """What one device of the pod holds and does for one train step (bytes, FLOPs, seconds)."""

    topology: str
    devices: int
    mesh: dict[str, int]
    params_bytes: int  # this device's shards of the parameters
    optimizer_bytes: int  # ... of the optimizer state (AdamW moments)
    argument_bytes: int  # XLA: all inputs (state + batch)
    temp_bytes: int  # XLA: activations and temporaries
    output_bytes: int  # XLA: outputs not aliased to donated inputs
    code_bytes: int
    hbm_bytes: int  # this device's share of its chip's HBM
    flops_per_step: float  # model FLOPs, whole pod
    peak_flops: float  # whole pod, bf16
    compile_seconds: float
    param_count: int  # the model's, towers and objective heads

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def step_seconds_at_peak(self) -> float:
        return self.flops_per_step / self.peak_flops


def _shard_bytes(tree: Any) -> int:
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )


def compile_step(
    config: ml_collections.ConfigDict, accelerator: Accelerator, devices: list[Any]
) -> CompiledStep:
    """Lowers and compiles the real train step of `config` on a mesh of `devices` (compile-only)."""
    mesh = make_mesh(config.mesh, devices)
    assembly = assemble(config, mesh)  # the loop's own step: what compiles here is what trains
    state = assembly.abstract_state()
    start = time.perf_counter()
    compiled = assembly.step.lower(state, assembly.abstract_batch()).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    per_chip = devices_per_chip(devices)
    chip = accelerator.chip
    return CompiledStep(
        topology=accelerator.name,
        devices=len(devices),
        mesh=dict(mesh.shape),
        params_bytes=_shard_bytes(state.params),
        optimizer_bytes=_shard_bytes(state.opt_state),
        argument_bytes=int(mem.argument_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes - mem.alias_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        hbm_bytes=int(chip.hbm_gib * 2**30 / per_chip),
        flops_per_step=train_flops_per_step(config),
        peak_flops=chip.peak_bf16_tflops * 1e12 * len(devices) / per_chip,
        compile_seconds=seconds,
        param_count=param_count(assembly.model),
    )


def accelerator_for(config: ml_collections.ConfigDict, topology: str | None) -> tuple[Accelerator, str]:
    """(the accelerator, its topology name): from config.hardware, or from --topology alone."""
    if config.hardware:
        accelerator = parse_hardware(config.hardware)
        return accelerator, topology or accelerator.topology()
    if not topology:
        raise UserError("give --topology=v5p:4x4x8 (generation:shape) or --config.hardware=tpu-v5p-256")
    generation, _, shape = topology.partition(":")
    names = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}
    if generation not in names or not shape:
        raise UserError(f"--topology={topology}: generation:shape with generation in {sorted(names)}")
    chips = math.prod(int(x) for x in shape.split("x"))
    cores = chips * (2 if names[generation] in ("v4", "v5p") else 1)
    return parse_hardware(f"tpu-{names[generation]}-{cores}"), topology


def describe(report: CompiledStep, config: ml_collections.ConfigDict) -> str:
    """The per-chip table compile.py prints."""
    gib = lambda n: f"{n / 2**30:9.3f} GiB"
    images = config.batch_size / report.step_seconds_at_peak
    millions = report.param_count / 1e6
    rows = [
        f"model            {config.model.size}: {millions:.1f}M parameters, {config.model.dtype}, "
        f"remat {config.model.remat}",
        f"pod              {report.topology}: {report.devices} devices, mesh {report.mesh}",
        f"global batch     {config.batch_size} (grad_accum_steps={config.optim.grad_accum_steps})",
        f"compile          {report.compile_seconds:.1f} s on this host",
        "per device:",
        f"  parameters     {gib(report.params_bytes)}",
        f"  optimizer      {gib(report.optimizer_bytes)}",
        f"  arguments      {gib(report.argument_bytes)}  (state + batch, XLA)",
        f"  temporaries    {gib(report.temp_bytes)}  (activations, XLA)",
        f"  outputs        {gib(report.output_bytes)}  (not aliased to donated inputs)",
        f"  code           {gib(report.code_bytes)}",
        f"  peak           {gib(report.peak_bytes)}  of {gib(report.hbm_bytes)} HBM"
        f" ({100 * report.peak_bytes / report.hbm_bytes:.0f} %)",
        f"FLOPs/step       {report.flops_per_step / 1e12:,.4g} TFLOP (model FLOPs, whole pod)",
        f"at peak          {1e3 * report.step_seconds_at_peak:.0f} ms/step, {images:,.0f} images/s "
        f"({report.peak_flops / 1e15:.1f} PFLOP/s bf16 peak; MFU 100 %)",
    ]
    return "\n".join(rows)


def find_fitting_overrides(
    config: ml_collections.ConfigDict, accelerator: Accelerator, devices: list[Any], hbm_bytes: int
) -> str | None:
    """The first of full remat, then 2/4/8 accumulation steps with it, that fits (compiled to check)."""
    trials = [("full", 1), ("full", 2), ("full", 4), ("full", 8)]
    for remat, k in trials:
        if (remat, k) == (config.model.remat, config.optim.grad_accum_steps):
            continue
        trial = ml_collections.ConfigDict(config.to_dict())
        trial.model.remat, trial.optim.grad_accum_steps = remat, k
        if (trial.batch_size // (len(devices) // trial.mesh.tensor)) % k:
            continue
        if compile_step(trial, accelerator, devices).peak_bytes <= hbm_bytes:
            return f"--config.model.remat={remat} --config.optim.grad_accum_steps={k}"
    return None
