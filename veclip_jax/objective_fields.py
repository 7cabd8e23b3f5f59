"""The objectives' configurable fields: `config.objective.NAME`, declared once, without JAX.

Each objective (veclip_jax/objectives/) is a frozen dataclass whose
configurable fields come from one of the dataclasses below (it inherits
them), so its config sub-section, its defaults (veclip_jax/defaults.py builds
`config.objective` from `config_fields`) and its constructor's arguments are
the same fields. They live here, outside the objectives package, because the
defaults and the experiment configs import them before JAX is imported (the
package imports JAX; importing it would cost the config files a second).

The defaults are the DeCLIP toolkit's YFCC-15M ViT-B/32 settings
(shared/spec/OBJECTIVES.md). `checks(name)` are the fields' range rules: every
field a finite number, an int field a whole number >= 1, a `*_weight` >= 0, a
`*temperature` > 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from veclip_jax.schema import Check


@dataclasses.dataclass(frozen=True)
class SigLipFields:
    """config.objective.siglip: the pairwise sigmoid loss (Zhai et al. 2023)."""

    temperature_init: float = math.log(10.0)  # t' (t = exp t'), replaces model.logit_scale_init
    bias_init: float = -10.0  # b, the learned bias, params["objective"]["bias"]


@dataclasses.dataclass(frozen=True)
class SlipFields:
    """config.objective.slip: CLIP + SimCLR on two augmented views."""

    clip_weight: float = 1.0  # CLIP on the standard crop (data.crop_scale)
    ssl_weight: float = 1.0  # SimCLR (NT-Xent) on the two views
    ssl_temperature: float = 0.1
    mlp_dim: int = 4096  # SimCLR MLP on the pre-projection class token: width -> 4096 -> 4096 -> 256
    ssl_dim: int = 256


@dataclasses.dataclass(frozen=True)
class DeclipFields:
    """config.objective.declip: multi-view CLIP + SimSiam + MLM + nearest-neighbour supervision."""

    clip_weight: float = 0.4  # 2 views x {caption, EDA caption} symmetric InfoNCE, averaged
    simsiam_weight: float = 0.2  # SimSiam between the two views
    mlm_weight: float = 0.2  # masked-token prediction on the caption (data.augment.mlm_prob)
    nn_weight: float = 0.2  # each view against the queue neighbours of both captions
    queue_size: int = 65_536  # text embeddings in the FIFO queue (one queue for the job)
    proj_dim: int = 1024  # SimSiam projector widths (3 layers)
    pred_dim: int = 512  # SimSiam predictor hidden width


@dataclasses.dataclass(frozen=True)
class FilipFields:
    """config.objective.filip: token-wise late interaction."""

    dense_weight: float = 1.0  # token-wise late-interaction InfoNCE
    clip_weight: float = 0.0  # the pooled CLIP loss (the toolkit's FILIP: 0, logged only)
    top_k: int = 16  # tokens each pair keeps for the others (image patches, text positions)
    token_dim: int = 256  # the shared token space
    dense_scale_init: float = math.log(1 / 0.07)  # FILIP's own temperature (not clipped)


@dataclasses.dataclass(frozen=True)
class DefilipFields(DeclipFields):
    """config.objective.defilip: DeCLIP's fields and FILIP's term."""

    filip_weight: float = 0.2  # FILIP's term between view 1 and the masked caption
    top_k: int = 16
    token_dim: int = 256
    dense_scale_init: float = math.log(1 / 0.07)


# Objective name -> its fields (CLIP has none), in the order of the objectives' registry.
FIELDS: dict[str, type] = {
    "siglip": SigLipFields,
    "slip": SlipFields,
    "declip": DeclipFields,
    "filip": FilipFields,
    "defilip": DefilipFields,
}


def config_fields(name: str) -> dict[str, Any]:
    """The configurable fields of objective `name` with their defaults ({} for one without)."""
    if name not in FIELDS:
        return {}
    return {f.name: f.default for f in dataclasses.fields(FIELDS[name])}


def checks(name: str) -> list[Check]:
    """The range rules of objective `name`'s fields (schema.check_ranges), field by field."""
    rules: list[Check] = []
    for field, default in config_fields(name).items():
        rules.append((field, math.isfinite, "must be a finite number"))
        if isinstance(default, int):
            rules.append((field, lambda x: x >= 1, "must be a whole number >= 1"))
        elif field.endswith("_weight"):
            rules.append((field, lambda x: x >= 0, "a loss weight must be >= 0"))
        elif field.endswith("temperature"):
            rules.append((field, lambda x: x > 0, "must be > 0"))
    return rules
