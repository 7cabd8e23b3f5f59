"""Training objectives behind one seam (base.py); `config.objective.name` picks one (make_objective)."""

from __future__ import annotations

from typing import Any

from veclip_jax.objectives.base import OBJECTIVE_PARAMS, Objective
from veclip_jax.objectives.clip import ClipObjective
from veclip_jax.objectives.siglip import SigLipObjective

OBJECTIVES = ("clip", "siglip")

__all__ = ["OBJECTIVES", "OBJECTIVE_PARAMS", "Objective", "make_objective"]


def make_objective(objective_cfg: Any = None) -> Objective:
    """The objective for a config's `objective` section (None: CLIP, the default)."""
    if objective_cfg is None:
        return ClipObjective()
    name = objective_cfg.name
    if name == "clip":
        return ClipObjective()
    if name == "siglip":
        s = objective_cfg.siglip
        return SigLipObjective(temperature_init=float(s.temperature_init), bias_init=float(s.bias_init))
    raise ValueError(f"config.objective.name={name!r}: use one of {', '.join(OBJECTIVES)}")
