"""Compile a config's real train step for a TPU pod on this (CPU) host, and print what each chip holds.

  python launch/compile.py --config=configs/vecap200m_b16.py                      # its config.hardware
  python launch/compile.py --config=configs/vecap200m_b16.py --topology=v5p:4x4x8  # or a topology
  python launch/compile.py --config=configs/tiny.py --topology=v5p:2x2x1 --json=report.json
  python launch/compile.py --config=configs/dfn_vecap300m_h14_336.py --search   # remat x accumulation
  python launch/compile.py --table=tests/golden_compile.json                     # the README's tables

The config's mesh rule for the pod is applied (config.hardware, or the one the
topology names), the mesh is built over libtpu's compile-only devices, and
the sharded step is compiled ahead of time. Prints per chip: parameters,
optimizer state, activations and temporaries (XLA's memory analysis), the
chip's HBM, FLOPs per step, and the step time and images/s the chip's peak
allows; then the step's roofline (veclip_jax/parallel/roofline.py): the least
time its FLOPs (at the chip's peak), its HBM traffic and its collectives need,
which bound wins, and the MFU ceiling that implies. A config that does not fit
exits 2, saying by how much and which overrides (remat, gradient
accumulation) would fit.

Fields given as `--config.X` flags win over the hardware's mesh rule (a note
says which the rule would have changed). `--search` compiles the remat x
accumulation candidates (train/aot.py `search_fit`), prints each one's peak
memory and roofline, and the cheapest that fits under --headroom of HBM.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Collection
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from veclip_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology generation:shape (default: from hardware).")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip to check against (default: the chip's).")
_JSON = flags.DEFINE_string("json", None, "Also write the per-device figures as JSON here.")
_FIND_FIT = flags.DEFINE_bool("find_fit", True, "If it does not fit, compile variants to find one that does.")
_SEARCH = flags.DEFINE_bool("search", False, "Compile remat x accumulation options; pick the cheapest fit.")
_HEADROOM = flags.DEFINE_float("headroom", 0.85, "--search: a candidate fits under this share of HBM.")
_MAX_ACCUM = flags.DEFINE_integer("max_accum", 8, "--search: the most gradient accumulation steps to try.")
_TABLE = flags.DEFINE_string("table", None, "Print the README's compile tables from this golden JSON; exit.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare(
    config: ml_collections.ConfigDict, given: Collection[str], topology: str | None
) -> tuple[ml_collections.ConfigDict, Any, str]:
    """(the config to compile, its accelerator, the topology): the hardware's mesh rule applied
    except to the fields `given` on the command line (a note on stderr for each the rule would
    change), and no data to read."""
    from veclip_jax.parallel.hardware import apply_mesh_rules, kept_over_rule
    from veclip_jax.train import aot

    accelerator, topology = aot.accelerator_for(config, topology)
    if not config.hardware:
        config.hardware = accelerator.name
    for note in kept_over_rule(config, given):
        print(f"note: {note}", file=sys.stderr)
    config, _ = apply_mesh_rules(config, keep=given)  # what the command line sets, wins
    # compiling reads no data (nor needs a mixture that was never released: DeCLIP-88M)
    config.data.update(allow_demo=True, train_files="", require_sources=False)
    config.data.sources = ml_collections.ConfigDict()
    return config, accelerator, topology


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _TABLE.value:
        from veclip_jax.train.aot import golden_tables

        with open(_TABLE.value) as f:
            print(golden_tables(json.load(f)))
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # jax: "Unable to initialize backend tpu"
    from veclip_jax.config import validate_config
    from veclip_jax.parallel.hardware import user_fields
    from veclip_jax.train import aot

    config = _CONFIG.value
    given = user_fields(config_flags.get_override_values(flags.FLAGS["config"]))
    searched = [f for f in given if f in ("model.remat", "optim.grad_accum_steps")]
    if _SEARCH.value and searched:
        _fail(f"--search tries model.remat and optim.grad_accum_steps itself: drop --config.{searched[0]}")
    try:
        config, accelerator, topology = prepare(config, given, _TOPOLOGY.value)
        devices = aot.topology_devices(topology, accelerator.slices)
        hosts = max(1, accelerator.total_chips // 4)  # 4 chips per TPU VM host
        validate_config(config, num_devices=len(devices), process_count=hosts)
        search: dict = {}
        if _SEARCH.value:
            hbm = _HBM.value * 2**30 if _HBM.value else accelerator.chip.hbm_gib * 2**30
            budget = _HEADROOM.value * hbm / aot.devices_per_chip(devices)
            tried, best = aot.search_fit(config, accelerator, devices, budget, _MAX_ACCUM.value)
            print(aot.describe_search(tried, best, budget))
            search = {"search": [aot.candidate_row(c, budget) for c in tried],
                      "choice": best.overrides if best else None}  # fmt: skip
            if best is None:
                _fail("no remat / accumulation setting fits: more chips?")
            config.model.remat, config.optim.grad_accum_steps = best.remat, best.grad_accum_steps
            report = best.report
        else:
            report = aot.compile_step(config, accelerator, devices)
    except UserError as e:
        _fail(str(e))
    if _HBM.value:
        report = dataclasses.replace(report, hbm_bytes=int(_HBM.value * 2**30))
    print(aot.describe(report, config))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(dataclasses.asdict(report) | report.summary() | search, f, indent=1)
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
