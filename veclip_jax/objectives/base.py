"""The objective seam: what the train step differentiates.

An objective turns the model's outputs (and the batch) into `loss, metrics`;
it declares what it needs so the step, the model and the config checks can
serve it without knowing which objective runs:

- `needs`: the model outputs / batch inputs it reads ("image_embeds",
  "text_embeds", "logit_scale", "objective", ...). Objectives that read only
  the pooled embeddings, the logit scale and their own scalar parameters
  (`pooled_only`) keep the exact gradient accumulation of train/step.py
  (gradient cache); the others refuse `grad_accum_steps > 1` (config.py).
- `extra_params`: scalar parameters it owns, name -> initial value. They live
  in the parameter tree under `objective/NAME` (models/clip.py), so they are
  trained, checkpointed and sharded like any parameter, and the HF export can
  recognise and drop them (hf/to_hf.py).
- `logit_scale_init`: when set, the model's temperature parameter starts
  there instead of at `config.model.logit_scale_init` (SigLIP: log 10).

The step, the loop's logging (every metric by name) and the checkpoint are
the same for every objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
from jax.sharding import Mesh

Outputs = Mapping[str, Any]
LossAndMetrics = tuple[jax.Array, dict[str, jax.Array]]

# The parameter-tree key under which objective-owned parameters live.
OBJECTIVE_PARAMS = "objective"


class Objective(Protocol):
    """`objective(outputs, batch, mesh=...) -> (loss, metrics)`; see the module doc."""

    name: str
    needs: tuple[str, ...]
    pooled_only: bool
    extra_params: tuple[tuple[str, float], ...]
    logit_scale_init: float | None

    def __call__(
        self, outputs: Outputs, batch: Mapping[str, jax.Array], *, mesh: Mesh | None
    ) -> LossAndMetrics: ...
