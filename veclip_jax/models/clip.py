"""Two towers, their projections and the learned temperature: HF `CLIPModel`'s layout.

Parameter tree (leading "layers" axis on the scanned blocks):
  vision_model/{embeddings/{patch_embedding,class_embedding,position_embedding},
                pre_layrnorm, encoder/layers/..., post_layernorm}
  text_model/{embeddings/{token_embedding,position_embedding}, encoder/layers/..., final_layer_norm}
  visual_projection/kernel, text_projection/kernel, logit_scale
  objective/...     the training objective's own parameters (SigLIP's bias, SLIP's MLP, ...),
                    only when it has some (veclip_jax/objectives/base.py); not part of HF
                    CLIPModel, dropped on export
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from veclip_jax.models.layers import REMAT_POLICIES, TransformerConfig, with_axes
from veclip_jax.models.text import TextTransformer
from veclip_jax.models.vit import VisionTransformer
from veclip_jax.objectives import make_objective
from veclip_jax.objectives.base import Objective, TowerDims
from veclip_jax.objectives.clip import ClipObjective


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


# What `CLIP.train_outputs` can give an objective (its `needs`), and from which batch input:
#   image_{embeds,projected,pooled,tokens}   batch["image"]: the L2-normalised embedding, the
#       projection before normalisation, the pooled class token before the projection, the
#       patch tokens of the last block (before post_layernorm) [B, N, width]
#   view_{embeds,projected,pooled,tokens}    the same for each augmented view of batch["views"]
#       [B, V, S, S, 3]: tuples of V arrays
#   text_{embeds,tokens}                     batch["tokens"]: embedding; final_layer_norm output
#       of every position [B, L, width]
#   text_valid                               batch["tokens"]: bool [B, L], the caption through
#       its end-of-text token (the positions that are not padding)
#   mlm_{embeds,tokens}                      batch["tokens_mlm"] (the masked caption), the same
#   eda_{embeds,tokens}                      batch["tokens_eda"] (the EDA caption), the same
#   logit_scale                              exp(parameter), clipped at logit_scale_max
#   objective                                the objective's heads (objectives/base.py), called
#                                            with all of the above that were asked for
IMAGE_OUTPUTS = ("embeds", "projected", "pooled", "tokens")
TEXT_INPUTS = {"text": "tokens", "mlm": "tokens_mlm", "eda": "tokens_eda"}
OUTPUTS = (
    *(f"{p}_{o}" for p in ("image", "view") for o in IMAGE_OUTPUTS),
    *(f"{p}_{o}" for p in TEXT_INPUTS for o in ("embeds", "tokens")),
    "text_valid",
    "logit_scale",
    "objective",
)


class CLIP(nn.Module):
    """`__call__(images, tokens)` -> {"image_embeds", "text_embeds", "logit_scale"}.

    Embeddings are L2-normalised float32; `logit_scale` is exp(parameter),
    clipped at `logit_scale_max`. Training calls `train_outputs(batch)`, which
    gives what the objective needs (OUTPUTS) and runs its heads.
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
    # The training objective (objectives/base.py): what train_outputs computes, and its heads.
    objective_spec: Objective = ClipObjective()

    def setup(self) -> None:
        self.vision_model = VisionTransformer(self.vision, self.image_size, self.patch_size)
        self.text_model = TextTransformer(self.text, self.vocab_size, self.context_length, self.eos_id)
        self.visual_projection = self._projection(self.vision)
        self.text_projection = self._projection(self.text)
        self.logit_scale = self.param(
            "logit_scale", with_axes(nn.initializers.constant(self.logit_scale_init)), ()
        )
        heads = self.objective_spec.heads(self.dims)
        if heads is not None:
            self.objective = heads

    @property
    def dims(self) -> TowerDims:
        return TowerDims(
            self.vision.width, self.text.width, self.embed_dim, self.vocab_size, self.vision.dtype
        )

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

    # Token-wise evaluation (veclip_jax/eval/tokenwise.py): the towers' tokens mapped by the objective's
    # heads into its token space (FILIP's image_mapping / text_mapping), L2-normalised per token. Only for
    # an objective whose heads map "view_tokens" and "text_tokens" to "image_tokens" / "text_tokens"
    # (FILIP); each call runs one tower and gives the other mapping an empty input.

    def encode_image_tokens(self, images: jax.Array) -> jax.Array:
        """float32 [B, N, D_tok]: the mapped patch tokens (no class token), unit norm per token."""
        _, tokens = self.vision_model(images, return_tokens=True)
        empty = jnp.zeros((tokens.shape[0], 0, self.text.width), tokens.dtype)
        return _l2_normalize(self.objective({"view_tokens": (tokens,), "text_tokens": empty})["image_tokens"])

    def encode_text_tokens(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(float32 [B, L, D_tok] mapped text tokens, unit norm per token and zero at padding;
        bool [B, L] validity: the caption through its end-of-text token, as `train_outputs`' text_valid)."""
        _, x = self.text_model(tokens, return_tokens=True)
        empty = jnp.zeros((x.shape[0], 0, self.vision.width), x.dtype)
        mapped = self.objective({"view_tokens": (empty,), "text_tokens": x})["text_tokens"]
        eot = jnp.argmax(tokens == self.eos_id, axis=-1)
        valid = jnp.arange(tokens.shape[1])[None, :] <= eot[:, None]
        return jnp.where(valid[..., None], _l2_normalize(mapped), 0.0), valid

    def scale(self) -> jax.Array:
        return jnp.minimum(jnp.exp(self.logit_scale), self.logit_scale_max)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, Any]:
        return {
            "image_embeds": self.encode_image(images),
            "text_embeds": self.encode_text(tokens),
            "logit_scale": self.scale(),
        }

    def _image(self, images: jax.Array, want: set[str]) -> dict[str, jax.Array]:
        out = {}
        if "tokens" in want:
            pooled, out["tokens"] = self.vision_model(images, return_tokens=True)
        else:
            pooled = self.vision_model(images)
        out["pooled"] = pooled
        if want & {"embeds", "projected"}:
            out["projected"] = self.visual_projection(pooled)
            out["embeds"] = _l2_normalize(out["projected"])
        return {k: v for k, v in out.items() if k in want}

    def _text(self, tokens: jax.Array, want: set[str]) -> dict[str, jax.Array]:
        out = {}
        if "tokens" in want:
            pooled, out["tokens"] = self.text_model(tokens, return_tokens=True)
        else:
            pooled = self.text_model(tokens)
        if "embeds" in want:
            out["embeds"] = _l2_normalize(self.text_projection(pooled))
        return out

    def train_outputs(self, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        """What the objective needs (OUTPUTS) for a training batch, its heads' outputs included."""
        needs = set(self.objective_spec.needs)
        unknown = needs - set(OUTPUTS)
        if unknown:
            raise ValueError(f"objective {self.objective_spec.name!r} needs unknown {sorted(unknown)}")
        want = lambda prefix: {n.split("_", 1)[1] for n in needs if n.startswith(prefix + "_")}
        out: dict[str, Any] = {}
        if w := want("image"):
            out.update({f"image_{k}": v for k, v in self._image(batch["image"], w).items()})
        if w := want("view"):
            views = [self._image(batch["views"][:, v], w) for v in range(batch["views"].shape[1])]
            out.update({f"view_{k}": tuple(v[k] for v in views) for k in w})
        for prefix, key in TEXT_INPUTS.items():
            if w := want(prefix) - {"valid"}:
                out.update({f"{prefix}_{k}": v for k, v in self._text(batch[key], w).items()})
        if "text_valid" in needs:
            eot = jnp.argmax(batch["tokens"] == self.eos_id, axis=-1)
            out["text_valid"] = jnp.arange(batch["tokens"].shape[1])[None, :] <= eot[:, None]
        if "logit_scale" in needs:
            out["logit_scale"] = self.scale()
        if "objective" in needs:
            out["objective"] = self.objective(out)
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
        objective_spec=objective,
    )


def dummy_inputs(model: CLIP, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Shape-only inputs for init and eval_shape."""
    images = jnp.zeros((batch, model.image_size, model.image_size, 3), jnp.float32)
    tokens = jnp.zeros((batch, model.context_length), jnp.int32)
    return images, tokens


def input_shapes(model: CLIP, batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of every training input the model's objective reads, for a batch of `batch`.

    "tokens" [B, L] always, "image" [B, S, S, 3] unless the objective reads
    the views only ("no_image"), "views" [B, V, S, S, 3] and the extra token
    rows [B, L] when the objective reads them (objectives/base.py): what the
    input pipeline gives and train/step.py `batch_inputs` takes.
    """
    s, length = model.image_size, model.context_length
    spec = model.objective_spec
    out = {"tokens": ((batch, length), jnp.int32)}
    if "no_image" not in spec.batch_keys:
        out["image"] = ((batch, s, s, 3), jnp.float32)
    if spec.views:
        out["views"] = ((batch, spec.views, s, s, 3), jnp.float32)
    for key in ("tokens_eda", "tokens_mlm", "mlm_labels"):
        if key in spec.batch_keys:
            out[key] = ((batch, length), jnp.int32)
    return out


def init_batch(model: CLIP, batch: int = 2) -> dict[str, jax.Array]:
    """A zero training batch with every input the model's objective reads (for init)."""
    return {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in input_shapes(model, batch).items()}


def init_params(model: CLIP, rng: jax.Array) -> Any:
    """Fresh parameters (logically boxed), heads of the objective included."""
    return model.init(rng, init_batch(model), method=CLIP.train_outputs)["params"]


def _abstract_params(model: CLIP) -> Any:
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def abstract_params(model: CLIP) -> Any:
    """The parameter tree as ShapeDtypeStructs, without logical-axis boxes (no memory used)."""
    return nn.unbox(_abstract_params(model))


def param_logical_specs(model: CLIP) -> Any:
    """Logical axis names of every parameter (no memory used)."""
    return nn.get_partition_spec(_abstract_params(model))


def param_count(model: CLIP) -> int:
    """Number of parameters, from shapes only (no memory used)."""
    return sum(x.size for x in jax.tree.leaves(abstract_params(model)))
