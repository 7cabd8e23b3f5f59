"""The objective seam: what the train step differentiates.

An objective turns the model's outputs (and the batch, and its own state)
into `loss, metrics`; it declares what it needs so the input pipeline, the
towers, the step and the config checks serve it without knowing which
objective runs:

- `inputs`: the batch keys it reads (veclip_jax/batch.py, the one schema):
  "image" (the standard crop; DeCLIP and FILIP read only views), "tokens",
  "views" (data.augment.views MoCoV2 views), "tokens_eda" (the caption after
  one EDA operation), "tokens_mlm" and "mlm_labels" (the masked caption and
  its targets). The pipeline makes exactly these; the step shards them.
- `views`: how many augmented views it reads (data.augment.views must match).
- `needs`: the model outputs it reads (models/clip.py OUTPUTS: pooled
  embeddings, pre-projection features, token features of the image, of each
  view, of each text input, "logit_scale"; and "objective", its heads'
  outputs).
- `pooled_only`: reads only the pooled embeddings, the logit scale and its
  own scalar parameters. Such objectives keep the exact gradient
  accumulation of train/step.py (gradient cache); the others refuse
  `grad_accum_steps > 1` (config.py).
- `heads(dims)`: a Flax module for the parameters it owns (scalars such as
  SigLIP's bias, MLP heads such as SLIP's), or None. Composed with the
  towers by objectives/model.py, it lives in the parameter tree under
  `objective/`, so it is trained, checkpointed and sharded like any
  parameter (its kernels name logical axes), and the HF export drops it,
  saying so. It is called with the tower outputs and its results appear as
  `outputs["objective"]`.
- `logit_scale_init`: when set, the model's temperature parameter starts
  there instead of at `config.model.logit_scale_init` (SigLIP: log 10).
- `gauges`: metrics that are values of the state rather than of the step
  (the temperature, a learned bias): logged as the window's last value, not
  its mean.
- state (DeCLIP's text queue): `init_state(rng, dims)` gives the arrays (a dict,
  {} for none), `state_axes()` their logical axis names (sharding),
  `next_state(outputs, state)` the state after a step (outside the
  gradient). It is part of the train state, so of every checkpoint; a step
  skipped for a non-finite loss leaves it unchanged.

The step, the loop's logging (every metric by name) and the checkpoint are
the same for every objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh

from veclip_jax.batch import DEFAULT_KEYS

Outputs = Mapping[str, Any]
LossAndMetrics = tuple[jax.Array, dict[str, jax.Array]]

# The parameter-tree key under which objective-owned parameters live.
OBJECTIVE_PARAMS = "objective"


class TowerDims(NamedTuple):
    """What an objective's heads and state need to know of the towers."""

    vision_width: int
    text_width: int
    embed_dim: int
    vocab_size: int
    dtype: Any


@dataclasses.dataclass(frozen=True)
class Objective:
    """`objective(outputs, batch, mesh=..., state=...) -> (loss, metrics)`; see the module doc.

    Objectives are frozen dataclasses (hashable: the model holds one as a
    static field); the defaults here are CLIP's: pooled embeddings, no
    heads, no state.
    """

    name: str = "clip"
    needs: tuple[str, ...] = ("image_embeds", "text_embeds", "logit_scale")
    inputs: tuple[str, ...] = DEFAULT_KEYS
    views: int = 0
    pooled_only: bool = True
    gauges: tuple[str, ...] = ("logit_scale",)

    @property
    def logit_scale_init(self) -> float | None:
        """The temperature parameter's initial value, or None for config.model.logit_scale_init."""
        return None

    def heads(self, dims: TowerDims) -> Any:
        """The Flax module of the parameters this objective owns, or None."""
        return None

    def init_state(self, rng: jax.Array, dims: TowerDims) -> dict[str, jax.Array]:
        """The objective's state arrays at step 0 ({} for none), a function of `rng` (from config.seed)."""
        return {}

    def state_axes(self) -> dict[str, tuple[str | None, ...]]:
        """Logical axis names of each state array (parallel/rules.py decides the mesh axes)."""
        return {}

    def next_state(self, outputs: Outputs, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The state after a step, from this step's outputs (no gradient flows through it)."""
        return state

    def __call__(
        self,
        outputs: Outputs,
        batch: Mapping[str, jax.Array],
        *,
        mesh: Mesh | None = None,
        state: Mapping[str, jax.Array] | None = None,
    ) -> LossAndMetrics:
        raise NotImplementedError(f"objective {self.name!r} has no loss")
