"""Training objectives behind one seam (base.py); `config.objective.name` picks one (make_objective).

| name    | what                                                        | notes              |
|---------|-------------------------------------------------------------|--------------------|
| clip    | symmetric InfoNCE, global batch (clip.py)                   | default            |
| siglip  | pairwise sigmoid, text blocks passed round (siglip.py)      | + bias             |
| slip    | CLIP + SimCLR on two MoCoV2 views (slip.py)                 | + MLP head         |
| declip  | multi-view CLIP + SimSiam + MLM + NN queue (declip.py)      | + heads, queue     |
| filip   | token-wise late interaction (filip.py)                      | + token mappings   |
| defilip | DeCLIP + FILIP's term (filip.py)                            | + all of the above |

Each objective's configurable fields are its config sub-section,
`config.objective.NAME`: declared once, JAX-free, in veclip_jax/objective_fields.py
(its dataclass inherits them; veclip_jax/defaults.py builds the section from
them), checked by the one checker (veclip_jax/schema.py) and passed to the
dataclass as they are.
"""

from __future__ import annotations

from typing import Any

from veclip_jax import schema
from veclip_jax.errors import ConfigError
from veclip_jax.objective_fields import checks, config_fields
from veclip_jax.objectives.base import OBJECTIVE_PARAMS, Objective, TowerDims
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
    "OBJECTIVES",
    "OBJECTIVE_PARAMS",
    "Objective",
    "TowerDims",
    "config_fields",
    "make_objective",
]


def make_objective(objective_cfg: Any = None) -> Objective:
    """The objective for a config's `objective` section (None: CLIP, the default).

    Raises ConfigError (a ValueError) naming the field for an unknown name or a bad value.
    """
    if objective_cfg is None:
        return ClipObjective()
    name = objective_cfg.name
    if name not in REGISTRY:
        raise ConfigError(f"config.objective.name={name!r}: use one of {', '.join(OBJECTIVES)}")
    fields = config_fields(name)
    section = objective_cfg.get(name) or {}
    where = f"config.objective.{name}"
    unknown = f"is not a field of objective {name!r} ({', '.join(fields)})"
    schema.check_section(section, fields, where, unknown=unknown)
    schema.check_ranges(section, [c for c in checks(name) if c[0] in section], where)
    return REGISTRY[name](**{k: type(fields[k])(section[k]) for k in fields if k in section})
