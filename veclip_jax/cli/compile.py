"""Compile a config's real train step for a TPU pod on this (CPU) host, and print what each chip holds.

  python launch/compile.py --config=configs/vecap200m_b16.py                      # its config.hardware
  python launch/compile.py --config=configs/vecap200m_b16.py --topology=v5p:4x4x8  # or a topology
  python launch/compile.py --config=configs/tiny.py --topology=v5p:2x2x1 --json=report.json

The config's mesh rule for the pod is applied (config.hardware, or the one the
topology names), the mesh is built over libtpu's compile-only devices, and
the sharded step is compiled ahead of time. Prints per chip: parameters,
optimizer state, activations and temporaries (XLA's memory analysis), the
chip's HBM, FLOPs per step, and the step time and images/s the chip's peak
allows. A config that does not fit exits 2, saying by how much and which
overrides (remat, gradient accumulation) would fit.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from veclip_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology generation:shape (default: from hardware).")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip to check against (default: the chip's).")
_JSON = flags.DEFINE_string("json", None, "Also write the per-device figures as JSON here.")
_FIND_FIT = flags.DEFINE_bool("find_fit", True, "If it does not fit, compile variants to find one that does.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # jax: "Unable to initialize backend tpu"
    from veclip_jax.config import validate_config
    from veclip_jax.parallel.hardware import apply_mesh_rules
    from veclip_jax.train import aot

    config = _CONFIG.value
    try:
        accelerator, topology = aot.accelerator_for(config, _TOPOLOGY.value)
        if not config.hardware:
            config.hardware = accelerator.name
        config, _ = apply_mesh_rules(config)
        # compiling reads no data (nor needs a mixture that was never released: DeCLIP-88M)
        config.data.update(allow_demo=True, train_files="", require_sources=False)
        config.data.sources = ml_collections.ConfigDict()
        devices = aot.topology_devices(topology, accelerator.slices)
        hosts = max(1, accelerator.total_chips // 4)  # 4 chips per TPU VM host
        validate_config(config, num_devices=len(devices), process_count=hosts)
        report = aot.compile_step(config, accelerator, devices)
    except UserError as e:
        _fail(str(e))
    if _HBM.value:
        report = dataclasses.replace(report, hbm_bytes=int(_HBM.value * 2**30))
    print(aot.describe(report, config))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(dataclasses.asdict(report) | {"peak_bytes": report.peak_bytes}, f, indent=1)
    if not report.fits:
        over = (report.peak_bytes - report.hbm_bytes) / 2**30
        fix = None
        if _FIND_FIT.value:
            fix = aot.find_fitting_overrides(config, accelerator, devices, report.hbm_bytes)
        need, have = report.peak_bytes / 2**30, report.hbm_bytes / 2**30
        hint = f"Fits with: {fix}" if fix else "no remat / accumulation setting found that fits: more chips?"
        _fail(f"does not fit: {need:.2f} GiB per device, {have:.2f} GiB HBM: {over:.2f} GiB over. {hint}")


def run() -> None:
    """The console script `veclip-compile` (and `python launch/compile.py`)."""
    app.run(main)
