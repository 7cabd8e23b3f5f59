"""Two towers, their projections and the learned temperature: HF `CLIPModel`'s layout.

Parameter tree (leading "layers" axis on the scanned blocks):
  vision_model/{embeddings/{patch_embedding,class_embedding,position_embedding},
                pre_layrnorm, encoder/layers/..., post_layernorm}
  text_model/{embeddings/{token_embedding,position_embedding}, encoder/layers/..., final_layer_norm}
  visual_projection/kernel, text_projection/kernel, logit_scale
  objective/NAME    scalars owned by the training objective (SigLIP's bias), only when it has
                    some (veclip_jax/objectives/base.py); not part of HF CLIPModel, dropped on export
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from veclip_jax.models.layers import REMAT_POLICIES, TransformerConfig, with_axes
from veclip_jax.models.text import TextTransformer
from veclip_jax.models.vit import VisionTransformer
from veclip_jax.objectives import make_objective


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class ObjectiveParams(nn.Module):
    """The objective's own scalar parameters, under `objective/` so export can tell them apart."""

    inits: tuple[tuple[str, float], ...]

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return {name: self.param(name, with_axes(nn.initializers.constant(v)), ()) for name, v in self.inits}


class CLIP(nn.Module):
    """`__call__(images, tokens)` -> {"image_embeds", "text_embeds", "logit_scale"}.

    Embeddings are L2-normalised float32; `logit_scale` is exp(parameter),
    clipped at `logit_scale_max`.
    """

    vision: TransformerConfig
    text: TransformerConfig
    image_size: int
    patch_size: int
    vocab_size: int
    context_length: int
    eos_id: int
    embed_dim: int
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    # (name, initial value) of the objective's scalar parameters (objective.extra_params).
    objective_params: tuple[tuple[str, float], ...] = ()

    def setup(self) -> None:
        self.vision_model = VisionTransformer(self.vision, self.image_size, self.patch_size)
        self.text_model = TextTransformer(self.text, self.vocab_size, self.context_length, self.eos_id)
        self.visual_projection = self._projection(self.vision)
        self.text_projection = self._projection(self.text)
        self.logit_scale = self.param(
            "logit_scale", with_axes(nn.initializers.constant(self.logit_scale_init)), ()
        )
        if self.objective_params:
            self.objective = ObjectiveParams(self.objective_params)

    def _projection(self, cfg: TransformerConfig) -> nn.Dense:
        return nn.Dense(
            self.embed_dim,
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            kernel_init=with_axes(nn.initializers.normal(cfg.width**-0.5), "embed", "proj"),
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        return _l2_normalize(self.visual_projection(self.vision_model(images)))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return _l2_normalize(self.text_projection(self.text_model(tokens)))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image_embeds": self.encode_image(images),
            "text_embeds": self.encode_text(tokens),
            "logit_scale": jnp.minimum(jnp.exp(self.logit_scale), self.logit_scale_max),
        }
        if self.objective_params:
            out["objective"] = self.objective()
        return out


def build_model(model_cfg: Any, *, unroll: bool = False, objective_cfg: Any = None) -> CLIP:
    """The CLIP module for a config's `model` section (see configs/base.py).

    `objective_cfg` (a config's `objective` section; None = CLIP) adds the
    objective's own parameters and may set the temperature's initial value
    (veclip_jax/objectives/base.py).

    `unroll` unrolls the layer scans: same parameters and math, slower to
    compile; XLA's cost analysis counts a scanned body once, an unrolled one
    per layer.
    """
    common = dict(
        unroll=unroll,
        act=model_cfg.act,
        layer_norm_eps=model_cfg.layer_norm_eps,
        dtype=jnp.dtype(model_cfg.dtype),
        remat=model_cfg.remat,
        attention=model_cfg.attention,
    )
    v, t = model_cfg.vision, model_cfg.text
    if model_cfg.act not in ("quick_gelu", "gelu"):
        raise ValueError(f"model.act={model_cfg.act!r}: use 'quick_gelu' or 'gelu'")
    if model_cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={model_cfg.remat!r}: use one of {sorted(REMAT_POLICIES)}")
    if model_cfg.attention not in ("auto", "xla", "cudnn"):
        raise ValueError(f"model.attention={model_cfg.attention!r}: use 'auto', 'xla' or 'cudnn'")
    for name, tower in (("vision", v), ("text", t)):
        if tower.width % tower.heads:
            raise ValueError(f"model.{name}.width={tower.width} is not divisible by heads={tower.heads}")
    if v.image_size % v.patch_size:
        raise ValueError(
            f"model.vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}"
        )
    objective = make_objective(objective_cfg)
    scale_init = objective.logit_scale_init
    return CLIP(
        vision=TransformerConfig(v.width, v.layers, v.heads, v.mlp_dim, causal=False, **common),
        text=TransformerConfig(t.width, t.layers, t.heads, t.mlp_dim, causal=True, **common),
        image_size=v.image_size,
        patch_size=v.patch_size,
        vocab_size=t.vocab_size,
        context_length=t.context_length,
        eos_id=t.eos_id,
        embed_dim=model_cfg.embed_dim,
        logit_scale_init=model_cfg.logit_scale_init if scale_init is None else scale_init,
        logit_scale_max=model_cfg.logit_scale_max,
        objective_params=tuple(objective.extra_params),
    )


def dummy_inputs(model: CLIP, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Shape-only inputs for init and eval_shape."""
    images = jnp.zeros((batch, model.image_size, model.image_size, 3), jnp.float32)
    tokens = jnp.zeros((batch, model.context_length), jnp.int32)
    return images, tokens


def _abstract_params(model: CLIP) -> Any:
    return jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model))["params"], jax.random.key(0))


def abstract_params(model: CLIP) -> Any:
    """The parameter tree as ShapeDtypeStructs, without logical-axis boxes (no memory used)."""
    return nn.unbox(_abstract_params(model))


def param_logical_specs(model: CLIP) -> Any:
    """Logical axis names of every parameter (no memory used)."""
    return nn.get_partition_spec(_abstract_params(model))


def param_count(model: CLIP) -> int:
    """Number of parameters, from shapes only (no memory used)."""
    return sum(x.size for x in jax.tree.leaves(abstract_params(model)))
