"""The towers composed with one objective: the model the train step differentiates.

`ObjectiveModel(towers, spec)` is a Flax module whose parameter tree is the
towers' own (models/clip.py, HF CLIPModel's layout, at the top level: they
share this module's scope) plus, when the objective has heads, its parameters
under `objective/` (SigLIP's bias, SLIP's MLP, DeCLIP's projector/predictor,
FILIP's token mappings). The towers know nothing of objectives; the
objective (objectives/base.py) names the tower outputs it reads (`needs`),
the batch keys (`inputs`, veclip_jax/batch.py), its heads and its state.

Everything that runs a model (training, evaluation, `veclip_jax.load`,
export) builds one with `build(model_cfg, objective)`, from an objective made
once by `make_objective(config.objective)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from veclip_jax import batch as batch_schema
from veclip_jax.models.clip import CLIP, build_model
from veclip_jax.models.layers import l2_normalize
from veclip_jax.objectives.base import OBJECTIVE_PARAMS, Objective, TowerDims
from veclip_jax.objectives.clip import ClipObjective


class ObjectiveModel(nn.Module):
    """The towers (their parameters at the top of the tree) and `spec`'s heads (under objective/)."""

    towers: CLIP
    spec: Objective = ClipObjective()

    def setup(self) -> None:
        nn.share_scope(self, self.towers)  # the towers' parameters stay where HF CLIPModel has them
        heads = self.spec.heads(self.dims)
        if heads is not None:
            self.objective = heads  # the attribute's name is the parameters' key: OBJECTIVE_PARAMS

    @property
    def dims(self) -> TowerDims:
        t = self.towers
        vision_width = t.embed_dim if t.stateful else t.vision.width  # the pooled image features
        return TowerDims(vision_width, t.text.width, t.embed_dim, t.vocab_size, t.vision.dtype)

    @property
    def batch_dims(self) -> batch_schema.Dims:
        """The sizes of this model's training batch (veclip_jax/batch.py)."""
        return batch_schema.Dims(self.towers.image_size, self.towers.context_length, self.spec.views)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, Any]:
        return self.towers(images, tokens)

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.towers.encode_image(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return self.towers.encode_text(tokens)

    def outputs(self, batch: Mapping[str, jax.Array], train: bool = True) -> dict[str, Any]:
        """What the objective needs from a training batch: the towers' outputs, its heads' as "objective".
        In training (`train`) a ResNet's BatchNorm uses the batch's statistics and updates its
        running averages: apply with mutable=["batch_stats"] (`apply_outputs`)."""
        needs = tuple(n for n in self.spec.needs if n != OBJECTIVE_PARAMS)
        out = self.towers.outputs(batch, needs, train)
        if OBJECTIVE_PARAMS in self.spec.needs:
            out[OBJECTIVE_PARAMS] = self.objective(out)
        return out

    # Token-wise evaluation (veclip_jax/eval/tokenwise.py): the towers' tokens mapped by the objective's
    # heads into its token space (FILIP's image_mapping / text_mapping), L2-normalised per token. Only for
    # an objective whose heads map "view_tokens" and "text_tokens" to "image_tokens" / "text_tokens"
    # (FILIP); each call runs one tower and gives the other mapping an empty input.

    def encode_image_tokens(self, images: jax.Array) -> jax.Array:
        """float32 [B, N, D_tok]: the mapped patch tokens (no class token), unit norm per token."""
        tokens = self.towers.image_tokens(images)
        empty = jnp.zeros((tokens.shape[0], 0, self.towers.text.width), tokens.dtype)
        mapped = self.objective({"view_tokens": (tokens,), "text_tokens": empty})["image_tokens"]
        return l2_normalize(mapped)

    def encode_text_tokens(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(float32 [B, L, D_tok] mapped text tokens, unit norm per token and zero at padding;
        bool [B, L] validity: the caption through its end-of-text token, as the outputs' text_valid)."""
        x = self.towers.text_tokens(tokens)
        empty = jnp.zeros((x.shape[0], 0, self.towers.vision_token_width), x.dtype)
        mapped = self.objective({"view_tokens": (empty,), "text_tokens": x})["text_tokens"]
        valid = self.towers.text_valid(tokens)
        return jnp.where(valid[..., None], l2_normalize(mapped), 0.0), valid


def build(model_cfg: Any, objective: Objective | None = None, *, unroll: bool = False) -> ObjectiveModel:
    """The towers of `model_cfg` with `objective` (None: CLIP), which may set the temperature's start."""
    objective = ClipObjective() if objective is None else objective
    towers = build_model(model_cfg, unroll=unroll, logit_scale_init=objective.logit_scale_init)
    return ObjectiveModel(towers, objective)


def init_batch(model: ObjectiveModel, batch: int = 2) -> dict[str, jax.Array]:
    """A zero training batch with every key the model's objective reads (for init and tracing)."""
    zeros = batch_schema.zeros(model.spec.inputs, batch, model.batch_dims)
    return {k: jnp.asarray(v) for k, v in zeros.items()}


# The towers' variable collections besides "params": a ResNet's BatchNorm running averages. They
# travel as the train state's `model_state` ({} for a ViT), beside the parameters, never trained.
MODEL_STATE = ("batch_stats",)


def variables(params: Any, model_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What `model.apply` takes: the parameters and the model state (BatchNorm's running averages)."""
    return {"params": params, **(model_state or {})}


def as_variables(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """`tree` as `model.apply` takes it: variables as they are, a bare parameter tree (no "params"
    key: a tower-only model's, e.g. a ViT's) as {"params": tree}."""
    return tree if "params" in tree else {"params": tree}


def apply_outputs(
    model: ObjectiveModel, params: Any, model_state: Mapping[str, Any], batch: Mapping[str, jax.Array]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training outputs and the model state after them (a ResNet's updated running averages;
    {} for a ViT): the one place training applies the model."""
    out, new_state = model.apply(
        variables(params, model_state), batch, method=ObjectiveModel.outputs, mutable=list(MODEL_STATE)
    )
    return out, dict(new_state)


def init_variables(model: ObjectiveModel, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
    """Fresh (parameters (logically boxed), model state): the objective's heads included."""
    v = dict(model.init(rng, init_batch(model), method=ObjectiveModel.outputs))
    params = v.pop("params")
    return params, nn.unbox({k: v[k] for k in MODEL_STATE if k in v})


def init_params(model: ObjectiveModel, rng: jax.Array) -> Any:
    """Fresh parameters (logically boxed), the objective's heads included."""
    return init_variables(model, rng)[0]


def abstract_model_state(model: ObjectiveModel) -> dict[str, Any]:
    """The model state as ShapeDtypeStructs ({} for a ViT; no memory used)."""
    return jax.eval_shape(lambda r: init_variables(model, r)[1], jax.random.key(0))


def _abstract_params(model: ObjectiveModel) -> Any:
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def abstract_params(model: ObjectiveModel) -> Any:
    """The parameter tree as ShapeDtypeStructs, without logical-axis boxes (no memory used)."""
    return nn.unbox(_abstract_params(model))


def param_logical_specs(model: ObjectiveModel) -> Any:
    """Logical axis names of every parameter (no memory used)."""
    return nn.get_partition_spec(_abstract_params(model))


def param_count(model: ObjectiveModel) -> int:
    """Number of parameters, from shapes only (no memory used)."""
    return sum(x.size for x in jax.tree.leaves(abstract_params(model)))
