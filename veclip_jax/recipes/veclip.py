"""The VeCLIP paper's runs as configs: the shared recipe, its mesh rules, and the results to compare.

Experiment files (`configs/vecap200m_b16.py`, ...) call `paper_config(name,
arg)`; the table `RUNS` holds what differs between the paper's rows (corpus,
caption mix, towers, samples seen, batch, target pod) and the numbers the
released checkpoints report (apple/ml-veclip README, shared/spec/VECLIP.md).

The paper's training recipe (its appendix) could not be read: every run uses
the fallback recipe of shared/spec/VECLIP.md, which is *not from the paper*:
AdamW (0.9, 0.98, eps 1e-6), weight decay 0.2 (not on norms, biases, the class
token, position tables, the temperature), peak learning rate 5e-4 after a
2,000-step linear warm-up, cosine to 0; RandomResizedCrop scale 0.9-1.0;
global batch 32,768 for >= 100M pairs (8,192 below); learnable temperature
from 1/0.07, clipped at 100; VeCap with probability 0.5 per visit (VeCLIP) or 0
(the CLIP baseline on AltTexts). Samples seen (also a fallback): 32 epochs of
the 3M/12M subsets, 2.05B samples for the larger B/16 runs, 4.1B for L/14 and
H/14.

`arg` "local" gives the run's local variant (big_vision's runlocal): the
same code path with the tiny towers, the demo data, a few steps, on
whatever devices there are.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from veclip_jax import defaults
from veclip_jax.eval import registry

# Mesh rules per tower size: (regex over config.hardware, field overrides); first match wins.
# FSDP over a whole slice up to 128 chips (the sharded widths 768/512, 1024/768, 1280/1024 all
# divide by 128); beyond, data parallel across FSDP groups that are whole planes of the torus
# (8x8 on v4/v5p, a 16-chip row on v5e/v6e: a mesh axis must be a product of physical axes, which
# make_mesh enforces). On GPUs: FSDP inside a node of 8, data parallel across nodes. Remat keeps
# matmul outputs ("dots") where HBM allows, else "full". launch/compile.py checks each target, and
# `compile.py --search` compiles remat x accumulation to pick the cheapest under 85 % of HBM: for H/14
# on tpu-v5p-1024 it keeps "full" (tests/golden_compile.json, its "search" record): dots peaks at 92 %
# of HBM, and dots with 2 accumulation steps fits but is slower (accumulation re-runs the forward pass).
_SMALL_SLICE = r"(8|16|32|64|128|256)"  # Cloud's counts up to 128 chips (v4/v5p count 2 per chip)


def mesh_rules(size: str) -> tuple:
    """The hardware rules of a paper config with towers `size` (B/16, L/14, H/14)."""
    remat = "full" if size == "H/14" else "dots"

    def rule(data: int, fsdp: int, remat: str) -> dict:
        return {"mesh.data": data, "mesh.fsdp": fsdp, "model.remat": remat, "model.dtype": "bfloat16"}

    return (
        (rf"tpu-(v4|v5p)-{_SMALL_SLICE}", rule(1, -1, remat)),
        (r"tpu-(v4|v5p)-\d+(-\d+)?", rule(-1, 64, remat)),  # an 8x8 plane of the torus per FSDP group
        (r"tpu-(v5litepod|v6e)-(4|8|16|32|64|128)", rule(1, -1, "full")),  # 16/32 GiB chips
        (r"tpu-(v5litepod|v6e)-\d+(-\d+)?", rule(-1, 16, "full")),  # one row of the 16x16 torus
        (r"gpu-h100-\d+", rule(-1, 8, remat)),
    )


@dataclasses.dataclass(frozen=True)
class Run:
    """One row of the paper's table."""

    title: str  # as the paper's table names it
    corpus: str  # what data.train_files / data.sources must hold
    sources: tuple[tuple[str, float, float], ...]  # (name, weight, vecap_prob); one source: train_files
    size: str  # towers: B/16, L/14, H/14 (H/14 at 336 px)
    pairs: int  # corpus size
    samples_seen: int
    batch_size: int
    hardware: str
    results: dict[str, float]  # the released checkpoints' numbers (COCO/Flickr R@1, ImageNet(-V2) top-1)


def _results(coco_i2t, coco_t2i, flickr_i2t, flickr_t2i, imagenet, imagenet_v2) -> dict[str, float]:
    return dict(coco_i2t=coco_i2t, coco_t2i=coco_t2i, flickr_i2t=flickr_i2t, flickr_t2i=flickr_t2i,
                imagenet=imagenet, imagenet_v2=imagenet_v2)  # fmt: skip


_ALT, _MIX = (("vecap", 1.0, 0.0),), (("vecap", 1.0, 0.5),)
_DFN = (("dfn", 1.0, 0.0),)
_DFN_VECAP = (("dfn", 0.5, 0.0), ("vecap300m", 0.5, 0.5))  # weights: fallback (the paper's are unknown)
_SMALL = dict(batch_size=8_192, hardware="tpu-v5p-64")
_B16 = dict(samples_seen=2_048_000_000, batch_size=32_768, hardware="tpu-v5p-256")
_LARGE = dict(samples_seen=4_096_000_000, batch_size=32_768)
_DFN_PAIRS, _DFN_VECAP_PAIRS = 2_000_000_000, 2_300_000_000

RUNS: dict[str, Run] = {
    "vecap3m_clip_b16": Run(
        "VeCap 3M, CLIP-B/16 (AltText)", "VeCap-3M", _ALT, "B/16", 3_000_000, 96_002_048, **_SMALL,
        results=_results(5.46, 3.28, 12.20, 6.36, 5.46, 7.09)),
    "vecap3m_b16": Run(
        "VeCap 3M, VeCLIP-B/16", "VeCap-3M", _MIX, "B/16", 3_000_000, 96_002_048, **_SMALL,
        results=_results(22.30, 13.01, 40.60, 27.58, 15.98, 13.51)),
    "vecap12m_clip_b16": Run(
        "VeCap 12M, CLIP-B/16 (AltText)", "VeCap-12M", _ALT, "B/16", 12_000_000, 384_000_000, **_SMALL,
        results=_results(24.52, 14.28, 44.70, 29.06, 31.60, 27.03)),
    "vecap12m_b16": Run(
        "VeCap 12M, VeCLIP-B/16", "VeCap-12M", _MIX, "B/16", 12_000_000, 384_000_000, **_SMALL,
        results=_results(47.78, 31.62, 73.90, 55.68, 38.11, 32.53)),
    "vecap100m_clip_b16": Run(
        "VeCap 100M, CLIP-B/16 (AltText)", "VeCap-100M", _ALT, "B/16", 100_000_000, **_B16,
        results=_results(47.24, 30.61, 74.40, 57.16, 58.64, 50.96)),
    "vecap100m_b16": Run(
        "VeCap 100M, VeCLIP-B/16", "VeCap-100M", _MIX, "B/16", 100_000_000, **_B16,
        results=_results(64.82, 46.12, 89.30, 73.10, 60.77, 54.17)),
    "vecap200m_clip_b16": Run(
        "VeCap 200M, CLIP-B/16 (AltText)", "VeCap-200M", _ALT, "B/16", 200_000_000, **_B16,
        results=_results(52.20, 34.97, 80.90, 63.26, 63.72, 56.84)),
    "vecap200m_b16": Run(
        "VeCap 200M, VeCLIP-B/16", "VeCap-200M", _MIX, "B/16", 200_000_000, **_B16,
        results=_results(67.20, 48.40, 91.10, 76.32, 64.64, 57.67)),
    "dfn_b16": Run(
        "DFN, VeCap-DFN-B/16", "DFN (AltTexts only)", _DFN, "B/16", _DFN_PAIRS, **_B16,
        results=_results(62.96, 43.20, 87.10, 70.44, 76.15, 68.19)),
    "vecap300m_b16": Run(
        "VeCap 300M, VeCap-DFN-B/16", "VeCap-300M", _MIX, "B/16", 300_000_000, **_B16,
        results=_results(64.74, 44.58, 90.10, 73.14, 46.43, 41.15)),
    "dfn_vecap300m_b16": Run(
        "DFN + VeCap 300M, VeCap-DFN-B/16", "DFN + VeCap-300M", _DFN_VECAP, "B/16", _DFN_VECAP_PAIRS, **_B16,
        results=_results(66.28, 45.12, 88.80, 73.56, 76.19, 69.58)),
    "dfn_vecap300m_l14": Run(
        "DFN + VeCap 300M, VeCap-DFN-L/14", "DFN + VeCap-300M", _DFN_VECAP, "L/14", _DFN_VECAP_PAIRS,
        **_LARGE, hardware="tpu-v5p-512", results=_results(71.06, 51.13, 93.10, 80.96, 81.95, 75.48)),
    "dfn_vecap300m_h14_336": Run(
        "DFN + VeCap 300M (336 px), VeCap-DFN-H/14", "DFN + VeCap-300M", _DFN_VECAP, "H/14", _DFN_VECAP_PAIRS,
        **_LARGE, hardware="tpu-v5p-1024", results=_results(72.78, 52.33, 93.60, 82.64, 83.07, 76.37)),
}  # fmt: skip

# The paper's evaluations (launch/eval.py's standard tasks), run during training too. Their
# data_dir defaults: TFDS's own, and ~/data for the Karpathy splits (override per entry).
_EVAL_DATA = {"imagenet": "~/tensorflow_datasets", "imagenet_v2": "~/tensorflow_datasets",
              "coco": "~/data", "flickr30k": "~/data"}  # fmt: skip


def paper_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of the paper's run `name` (a key of RUNS); `arg` "local" gives its local variant."""
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/{name}.py:{arg}: the only variant is :local")
    run = RUNS[name]
    if arg == "local":
        return local_variant(run)
    c = defaults.get_config(run.size)
    c.batch_size = run.batch_size
    c.total_steps = run.samples_seen // run.batch_size
    c.log_every = 100
    c.checkpoint_every = 1000
    c.eval_every = 5000
    c.eval_batch_size = 4096  # divides over every pod's batch shards (up to 4,096 devices)
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 2000
    c.hardware = run.hardware
    c.mesh_rules = mesh_rules(run.size)
    c.data.allow_demo = False
    c.data.num_workers = 8
    c.data.num_threads = 2
    if len(run.sources) == 1:
        c.data.vecap_prob = run.sources[0][2]
    else:
        c.data.sources = {
            source: dict(files="", weight=weight, vecap_prob=vecap_prob)
            for source, weight, vecap_prob in run.sources
        }
    c.evals = {task: registry.standard_task(task) | dict(data_dir=_EVAL_DATA[task]) for task in _EVAL_DATA}
    return c


def local_base(size: str) -> ml_collections.ConfigDict:
    """What every `:local` variant shares: tiny towers on the demo data, 3 steps of 16 on a CPU, and
    the mesh rules of the real towers (`size`), shown and checked, applied only with a hardware name."""
    c = defaults.get_config("tiny")
    c.batch_size = 16
    c.total_steps = 3
    c.log_every = 1
    c.checkpoint_every = 0  # the last step only
    c.eval_every = 3
    c.eval_batch_size = 64
    c.optim.warmup_steps = 1
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.mesh_rules = mesh_rules(size)
    return c


def local_variant(run: Run) -> ml_collections.ConfigDict:
    """The run's code path on a CPU: tiny towers, the demo data, a few steps, the same caption mix."""
    c = local_base(run.size)
    c.data.vecap_prob = max(vecap_prob for _, _, vecap_prob in run.sources)
    return c
