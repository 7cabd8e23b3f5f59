"""Training objectives behind one seam (base.py); `config.objective.name` picks one (make_objective).

| name    | what                                                        | notes              |
|---------|-------------------------------------------------------------|--------------------|
| clip    | symmetric InfoNCE, global batch (clip.py)                   | default            |
| siglip  | pairwise sigmoid, text blocks passed round (siglip.py)      | + bias             |
| slip    | CLIP + SimCLR on two MoCoV2 views (slip.py)                 | + MLP head         |
| declip  | multi-view CLIP + SimSiam + MLM + NN queue (declip.py)      | + heads, queue     |
| filip   | token-wise late interaction (filip.py)                      | + token mappings   |
| defilip | DeCLIP + FILIP's term (filip.py)                            | + all of the above |

Each objective's fields are its config sub-section, `config.objective.NAME`
(veclip_jax/defaults.py), passed to its dataclass as they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from veclip_jax.objectives.base import BATCH_EXTRAS, OBJECTIVE_PARAMS, Objective, TowerDims
from veclip_jax.objectives.clip import ClipObjective
from veclip_jax.objectives.declip import DeclipObjective
from veclip_jax.objectives.filip import DefilipObjective, FilipObjective
from veclip_jax.objectives.siglip import SigLipObjective
from veclip_jax.objectives.slip import SlipObjective

REGISTRY: dict[str, type[Objective]] = {
    "clip": ClipObjective,
    "siglip": SigLipObjective,
    "slip": SlipObjective,
    "declip": DeclipObjective,
    "filip": FilipObjective,
    "defilip": DefilipObjective,
}
OBJECTIVES = tuple(REGISTRY)

__all__ = [
    "BATCH_EXTRAS",
    "OBJECTIVES",
    "OBJECTIVE_PARAMS",
    "Objective",
    "TowerDims",
    "batch_keys_for",
    "config_fields",
    "make_objective",
]

# Fields every objective has, set by its class rather than by the config.
_FIXED = {f.name for f in dataclasses.fields(Objective)}


def config_fields(name: str) -> dict[str, Any]:
    """The configurable fields of objective `name` with their defaults (its `config.objective.NAME`)."""
    return {f.name: f.default for f in dataclasses.fields(REGISTRY[name]) if f.name not in _FIXED}


def _check(name: str, field: str, value: Any, default: Any) -> Any:
    """`value` as the field's type (int fields: whole numbers >= 1), or ValueError naming the field."""
    where = f"config.objective.{name}.{field}={value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number")
    if isinstance(default, int):
        if value != int(value) or value < 1:
            raise ValueError(f"{where}: must be a whole number >= 1")
        return int(value)
    if field.endswith("_weight") and value < 0:
        raise ValueError(f"{where}: a loss weight must be >= 0")
    if field.endswith("temperature") and value <= 0:
        raise ValueError(f"{where}: must be > 0")
    return float(value)


def make_objective(objective_cfg: Any = None) -> Objective:
    """The objective for a config's `objective` section (None: CLIP, the default).

    Raises ValueError naming the field for an unknown name or a bad value.
    """
    if objective_cfg is None:
        return ClipObjective()
    name = objective_cfg.name
    if name not in REGISTRY:
        raise ValueError(f"config.objective.name={name!r}: use one of {', '.join(OBJECTIVES)}")
    fields = config_fields(name)
    section = objective_cfg.get(name) or {}
    values = {k: _check(name, k, section[k], default) for k, default in fields.items() if k in section}
    return REGISTRY[name](**values)


def batch_keys_for(name: str) -> tuple[str, ...]:
    """What the input pipeline must supply for objective `name` beyond image and tokens (base.py)."""
    return REGISTRY[name].batch_keys if name in REGISTRY else ()
