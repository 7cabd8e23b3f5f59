"""Compile the real sharded train step for a TPU pod on a CPU host (maxtext's train_compile idea).

libtpu gives compile-only TPU devices for a named topology (`v5p:4x4x8`) on
any host; the step is lowered for abstract inputs placed on a mesh of them
and compiled by the TPU compiler. XLA's memory analysis then says what each
chip holds (arguments, temporaries, code), before a pod is booked, and its cost
analysis the step's roofline (parallel/roofline.py: the least time its FLOPs,
HBM traffic and collectives need; the bound that wins and the MFU ceiling).
`search_fit` compiles the remat x gradient-accumulation candidates and picks
the cheapest that fits.

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
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from veclip_jax.errors import UserError
from veclip_jax.objectives.model import param_count
from veclip_jax.parallel.hardware import Accelerator, devices_per_chip, parse_hardware
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.parallel.roofline import Bounds, step_roofline
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
class CompiledStep(Bounds):
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
    remat: str = ""  # as compiled (the mesh rule's, or the command line's)
    grad_accum_steps: int = 1
    # The roofline, per device (parallel/roofline.py): XLA's FLOPs and bytes accessed with the
    # loops' trips applied, the collectives' bytes, and the three lower bounds in seconds.
    xla_flops: float = 0.0
    bytes_accessed: float = 0.0
    collective_bytes: float = 0.0
    compute_s: float = 0.0
    memory_s: float = 0.0
    collective_s: float = 0.0

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def step_seconds_at_peak(self) -> float:
        return self.flops_per_step / self.peak_flops

    @property
    def ideal_s(self) -> float:
        return self.step_seconds_at_peak

    def summary(self) -> dict[str, Any]:
        """The golden table's row (tests/golden_compile.json): bytes, FLOPs, the roofline."""
        keep = ("devices", "mesh", "params_bytes", "optimizer_bytes", "argument_bytes", "temp_bytes",
                "hbm_bytes", "flops_per_step", "remat", "grad_accum_steps", "xla_flops", "bytes_accessed",
                "collective_bytes", "compute_s", "memory_s", "collective_s")  # fmt: skip
        row = {k: getattr(self, k) for k in keep}
        return row | {"peak_bytes": self.peak_bytes, "bound": self.bound, "mfu_ceiling": self.mfu_ceiling}


def _shard_bytes(tree: Any) -> int:
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )


def compile_step(
    config: ml_collections.ConfigDict, accelerator: Accelerator, devices: list[Any]
) -> CompiledStep:
    """Lowers and compiles the real train step of `config` on a mesh of `devices` (compile-only),
    with its memory per device and its roofline on `accelerator`'s chip."""
    mesh = make_mesh(config.mesh, devices)
    assembly = assemble(config, mesh)  # the loop's own step: what compiles here is what trains
    state = assembly.abstract_state()
    start = time.perf_counter()
    compiled = assembly.step.lower(state, assembly.abstract_batch()).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    per_chip = devices_per_chip(devices)
    chip = accelerator.chip
    model_flops = train_flops_per_step(config)
    roof, _ = step_roofline(compiled, chip, model_flops / len(devices), per_chip)
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
        flops_per_step=model_flops,
        peak_flops=chip.peak_bf16_tflops * 1e12 * len(devices) / per_chip,
        compile_seconds=seconds,
        param_count=param_count(assembly.model),
        remat=str(config.model.remat),
        grad_accum_steps=int(config.optim.grad_accum_steps),
        xla_flops=roof.flops,
        bytes_accessed=roof.bytes_accessed,
        collective_bytes=roof.collective_bytes,
        compute_s=roof.compute_s,
        memory_s=roof.memory_s,
        collective_s=roof.collective_s,
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
        *roofline_rows(report, parse_hardware(report.topology).chip),
    ]
    return "\n".join(rows)


def roofline_rows(report: CompiledStep, chip: Any) -> list[str]:
    """The roofline lines of `describe`: each bound's quantity, rate and time, the winner, the ceiling."""
    per_chip = report.devices and max(1, round(report.devices / parse_hardware(report.topology).total_chips))
    ms = lambda s: f"{1e3 * s:8.1f} ms"
    ratio = report.xla_flops * report.devices / max(report.flops_per_step, 1.0)
    return [
        "roofline per device (lower bounds: XLA's cost analysis of the compiled step, loops' trips applied):",
        f"  compute        {ms(report.compute_s)}  {report.xla_flops / 1e12:,.2f} TFLOP at "
        f"{chip.peak_bf16_tflops / per_chip:g} TFLOP/s ({ratio:.2f}x the model FLOPs: remat, softmax, "
        "optimizer)",
        f"  memory         {ms(report.memory_s)}  {report.bytes_accessed / 1e9:,.1f} GB accessed at "
        f"{chip.hbm_gbps / per_chip:g} GB/s HBM",
        f"  collective     {ms(report.collective_s)}  {report.collective_bytes / 1e9:,.2f} GB moved at "
        f"{chip.ici_gbps / per_chip:g} GB/s interconnect (one direction)",
        f"  bound          {report.bound}: {1e3 * report.bound_s:.1f} ms/step; MFU ceiling "
        f"{100 * report.mfu_ceiling:.0f} % (model FLOPs / (bound x peak))",
    ]


# Remat policies, least recomputation first: none keeps every activation, dots recomputes what is
# not a matmul output, full recomputes the whole forward pass in the backward one.
REMATS = ("none", "dots", "full")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One remat x accumulation setting the search tried: its compiled report, or why it was refused."""

    remat: str
    grad_accum_steps: int
    report: CompiledStep | None
    refused: str = ""  # the config check's reason (accumulation the batch or objective does not allow)

    @property
    def overrides(self) -> str:
        return f"--config.model.remat={self.remat} --config.optim.grad_accum_steps={self.grad_accum_steps}"

    def fits(self, budget_bytes: float) -> bool:
        return self.report is not None and self.report.peak_bytes <= budget_bytes


def search_fit(
    config: ml_collections.ConfigDict,
    accelerator: Accelerator,
    devices: list[Any],
    budget_bytes: float,
    max_accum: int = 8,
    compile_fn: Callable[..., CompiledStep] = compile_step,
) -> tuple[list[Candidate], Candidate | None]:
    """Compiles remat x gradient-accumulation candidates and picks the cheapest that fits.

    Remat policies go from the least recomputation (none, dots, full); each is tried with 1, 2, 4
    ... `max_accum` accumulation steps until one peaks under `budget_bytes` (e.g. 85 % of HBM; more
    steps only add weight gathers). A policy that fits without accumulation ends the search (more
    recomputation cannot be cheaper). Settings the config check refuses (steps that do not divide
    the per-shard batch, a BatchNorm tower, an objective that cannot accumulate) are listed with the
    reason. Of those that fit, the cheapest: the lowest roofline bound, then less recomputation,
    then fewer steps. Returns (every candidate tried, the choice or None).
    """
    from veclip_jax.config import validate_config
    from veclip_jax.errors import ConfigError

    tried: list[Candidate] = []
    for remat in REMATS:
        k = 1
        while k <= max_accum:
            trial = ml_collections.ConfigDict(config.to_dict())
            trial.model.remat, trial.optim.grad_accum_steps = remat, k
            try:
                validate_config(trial, num_devices=len(devices))
            except ConfigError as e:
                tried.append(Candidate(remat, k, None, str(e)))
                k *= 2
                continue
            candidate = Candidate(remat, k, compile_fn(trial, accelerator, devices))
            tried.append(candidate)
            if candidate.fits(budget_bytes):
                break
            k *= 2
        if any(c.remat == remat and c.grad_accum_steps == 1 and c.fits(budget_bytes) for c in tried):
            break
    fitting = [c for c in tried if c.fits(budget_bytes)]
    if not fitting:
        return tried, None
    best = min(fitting, key=lambda c: (c.report.bound_s, REMATS.index(c.remat), c.grad_accum_steps))
    return tried, best


def describe_search(tried: list[Candidate], best: Candidate | None, budget_bytes: float) -> str:
    """The table `compile.py --search` prints: each candidate's peak memory and roofline."""
    rows = [f"search: remat x grad_accum_steps, fits = peak <= {budget_bytes / 2**30:.1f} GiB per device",
            f"  {'remat':6} {'accum':>5} {'peak GiB':>9} {'compute':>9} {'memory':>9} {'collect.':>9} "
            f"{'bound':>10} {'MFU ceil':>8}  fits"]  # fmt: skip
    for c in tried:
        if c.report is None:
            rows.append(f"  {c.remat:6} {c.grad_accum_steps:>5}  refused: {c.refused}")
            continue
        r = c.report
        ms = lambda s: f"{1e3 * s:7.1f}ms"
        rows.append(
            f"  {c.remat:6} {c.grad_accum_steps:>5} {r.peak_bytes / 2**30:9.2f} {ms(r.compute_s):>9} "
            f"{ms(r.memory_s):>9} {ms(r.collective_s):>9} {r.bound:>10} {100 * r.mfu_ceiling:7.0f}%  "
            f"{'yes' if c.fits(budget_bytes) else 'no'}{'  <- cheapest' if c is best else ''}"
        )
    rows.append(f"cheapest that fits: {best.overrides}" if best else "nothing fits: more chips?")
    return "\n".join(rows)


def find_fitting_overrides(
    config: ml_collections.ConfigDict, accelerator: Accelerator, devices: list[Any], hbm_bytes: int
) -> str | None:
    """The overrides of the cheapest remat / accumulation setting that fits `hbm_bytes` (compiled
    to check: `search_fit`), or None."""
    _, best = search_fit(config, accelerator, devices, hbm_bytes)
    return best.overrides if best else None


def candidate_row(candidate: Candidate, budget_bytes: float) -> dict[str, Any]:
    """A search candidate as the JSON report (and the golden table) records it."""
    row: dict[str, Any] = {"remat": candidate.remat, "grad_accum_steps": candidate.grad_accum_steps}
    if candidate.report is None:
        return row | {"refused": candidate.refused}
    r = candidate.report
    return row | {"peak_bytes": r.peak_bytes, "bound": r.bound, "bound_s": r.bound_s,
                  "mfu_ceiling": r.mfu_ceiling, "fits": candidate.fits(budget_bytes)}  # fmt: skip


def _mesh_text(mesh: dict[str, int]) -> str:
    return "x".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"


def _roofline_cells(row: dict[str, Any]) -> list[str]:
    """remat / accum, the three bounds in ms, the winner and the MFU ceiling ("—" before they were
    recorded: a row compiled before the roofline existed)."""
    setting = f"{row['remat']} / {row['grad_accum_steps']}" if "remat" in row else "—"
    if "compute_s" not in row:
        return [setting, "—", "—", "—"]
    ms = lambda s: f"{1e3 * s:.3g}"
    bounds = f"{ms(row['compute_s'])} / {ms(row['memory_s'])} / {ms(row['collective_s'])}"
    return [setting, bounds, row["bound"], f"{100 * row['mfu_ceiling']:.0f} %"]


def golden_tables(golden: dict[str, dict[str, Any]]) -> str:
    """The README's compile tables (the paper's configs, then the DeCLIP toolkit's) in Markdown,
    from tests/golden_compile.json: `python launch/compile.py --table=tests/golden_compile.json`."""
    from veclip_jax.recipes import declip, veclip

    roof = ["remat / accum", "bound ms: compute / memory / collective", "bound", "MFU ceiling"]
    common = ["target", "mesh", "memory per chip", "FLOPs/step", *roof]

    def cells(name: str) -> list[str]:
        row = golden[name]
        memory = f"{row['peak_bytes'] / 2**30:.1f} of {row['hbm_bytes'] / 2**30:.0f} GiB"
        flops = f"{row['flops_per_step'] / 1e15:.2f} PFLOP"
        return [row["hardware"], _mesh_text(row["mesh"]), memory, flops, *_roofline_cells(row)]

    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]

    paper = []
    for name, run in veclip.RUNS.items():
        if name not in golden:
            continue
        pair = lambda a, b, r=run.results: f"{r[a]:.2f} / {r[b]:.2f}"
        paper.append([f"`{name}`", pair("coco_i2t", "coco_t2i"), pair("flickr_i2t", "flickr_t2i"),
                      pair("imagenet", "imagenet_v2"),
                      f"{run.samples_seen / 1e9:.3g}B", f"{run.batch_size:,}",
                      f"{run.samples_seen // run.batch_size:,}", *cells(name)])  # fmt: skip
    toolkit_top1 = {f"yfcc15m_{o}_r50": r[2] for o, r in declip.RECIPES_R50.items()} | {
        f"declip88m_declip_{tower}": top1 for tower, top1 in declip.DECLIP88M.items()
    }
    toolkit = [[f"`{name}`", f"{top1}", f"{declip.TOTAL_STEPS * declip.BATCH_SIZE / 1e9:.3g}B",
                f"{declip.BATCH_SIZE:,}", f"{declip.TOTAL_STEPS:,}", *cells(name)]
               for name, top1 in toolkit_top1.items() if name in golden]  # fmt: skip
    head = ["config", "paper: COCO I2T / T2I", "Flickr I2T / T2I", "ImageNet / V2", "samples seen", "batch",
            "steps", *common]  # fmt: skip
    toolkit_head = ["config", "toolkit: ImageNet 0-shot top-1", "samples seen", "batch", "steps", *common]
    return "\n".join([*table(head, paper), "", *table(toolkit_head, toolkit)])
