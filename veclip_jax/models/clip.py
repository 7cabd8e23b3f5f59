"""Two towers, their projections and the learned temperature: HF `CLIPModel`'s layout.

Parameter tree (leading "layers" axis on the scanned blocks):
  vision_model/{embeddings/{patch_embedding,class_embedding,position_embedding},
                pre_layrnorm, encoder/layers/..., post_layernorm}
  text_model/{embeddings/{token_embedding,position_embedding}, encoder/layers/..., final_layer_norm}
  visual_projection/kernel, text_projection/kernel, logit_scale

The image tower is a ViT (models/vit.py) or CLIP's ModifiedResNet (models/resnet.py,
`model.vision.type="resnet"`): its attention pool projects to the joint embedding itself, so a
ResNet has no visual_projection, and its BatchNorm running averages are the "batch_stats"
collection beside "params" (`CLIP.stateful`): training updates them (`outputs(..., train=True)`,
statistics of the global batch), every other use reads them.

Pixels in: the image tower takes uint8 RGB [B, S, S, 3] (or float pixels in [0, 255]: VeCLIP's TF-style
bilinear evaluation resize is not rounded) and normalises them with the model's image mean/std
(`normalize_pixels`, config.model.vision.image_mean / image_std) inside the jitted computation, so the
host sends 1 byte a channel instead of 4 and spends no CPU on the arithmetic (issue 25). Every image
input (`image`, each view, `encode_image`, `image_tokens`) goes through `_vision`, the one place.

Towers only: a training objective's own parameters (SigLIP's bias, SLIP's
MLP, ...) are the objective's, composed with these towers outside models/
(veclip_jax/objectives/model.py), beside them in one tree under objective/.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from veclip_jax.batch import TEXT_INPUTS
from veclip_jax.defaults import CLIP_MEAN, CLIP_STD  # CLIP's (OpenAI's) statistics on [0, 1] pixels
from veclip_jax.models.layers import TransformerConfig, l2_normalize, with_axes
from veclip_jax.models.resnet import ModifiedResNet, ResNetConfig
from veclip_jax.models.text import TextTransformer
from veclip_jax.models.vit import VisionTransformer

# What `CLIP.outputs(batch, needs)` can give (an objective's `needs`), and from which batch key:
#   image_{embeds,projected,pooled,tokens}   batch["image"]: the L2-normalised embedding, the
#       projection before normalisation, the pooled class token before the projection, the
#       patch tokens of the last block (before post_layernorm) [B, N, width]; for a ResNet, the
#       attention pool's output (pooled = projected) and the last feature map's positions
#       [B, (S/32)^2, 32 x width]
#   view_{embeds,projected,pooled,tokens}    the same for each augmented view of batch["views"]
#       [B, V, S, S, 3]: tuples of V arrays
#   {text,mlm,eda}_{embeds,tokens}           the token rows the batch schema marks as encoded
#       (veclip_jax/batch.py TEXT_INPUTS: tokens, tokens_mlm, tokens_eda): the embedding; the
#       final_layer_norm output of every position [B, L, width]
#   text_valid                               batch["tokens"]: bool [B, L], the caption through
#       its end-of-text token (the positions that are not padding)
#   logit_scale                              exp(parameter), clipped at logit_scale_max
IMAGE_OUTPUTS = ("embeds", "projected", "pooled", "tokens")
OUTPUTS = (
    *(f"{p}_{o}" for p in ("image", "view") for o in IMAGE_OUTPUTS),
    *(f"{p}_{o}" for p in TEXT_INPUTS for o in ("embeds", "tokens")),
    "text_valid",
    "logit_scale",
)


def pixel_constants(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(mean * 255, 1 / (std * 255)) as float32 constants, computed as the host normalisation did
    (data/image_ops.py `normalize`), so the in-jit result is the host's to the bit."""
    mean_255 = np.asarray(mean, np.float32) * np.float32(255.0)
    return mean_255, np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))


def normalize_pixels(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8 (or float, 0-255) RGB pixels [..., 3] -> float32 (x - 255 mean) / (255 std), per channel.

    The arithmetic of the host's former `image_ops.normalize` (subtract, then multiply by the
    reciprocal, in float32); the tower then casts to its compute dtype as before.
    """
    mean_255, inv_std_255 = pixel_constants(mean, std)
    return (images.astype(jnp.float32) - mean_255) * inv_std_255


class CLIP(nn.Module):
    """`__call__(images, tokens)` -> {"image_embeds", "text_embeds", "logit_scale"}.

    Embeddings are L2-normalised float32; `logit_scale` is exp(parameter),
    clipped at `logit_scale_max`. Training calls `outputs(batch, needs)`,
    which gives the named OUTPUTS an objective reads.
    """

    vision: TransformerConfig | ResNetConfig
    text: TransformerConfig
    image_size: int
    patch_size: int
    vocab_size: int
    context_length: int
    eos_id: int
    embed_dim: int
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    image_mean: tuple[float, float, float] = CLIP_MEAN  # pixels are normalised with these (in jit)
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def stateful(self) -> bool:
        """Whether the towers keep variables besides "params" (a ResNet's BatchNorm "batch_stats")."""
        return isinstance(self.vision, ResNetConfig)

    @property
    def vision_token_width(self) -> int:
        """The width of the image tokens ("image_tokens"): the ViT's, or the ResNet's last map's channels."""
        return self.vision.token_width if self.stateful else self.vision.width

    def setup(self) -> None:
        if self.stateful:
            self.vision_model = ModifiedResNet(self.vision)
            self.visual_projection = lambda x: x  # the attention pool ends in the joint embedding
        else:
            self.vision_model = VisionTransformer(self.vision, self.image_size, self.patch_size)
            self.visual_projection = self._projection(self.vision)
        self.text_model = TextTransformer(self.text, self.vocab_size, self.context_length, self.eos_id)
        self.text_projection = self._projection(self.text)
        self.logit_scale = self.param(
            "logit_scale", with_axes(nn.initializers.constant(self.logit_scale_init)), ()
        )

    def _projection(self, cfg: TransformerConfig) -> nn.Dense:
        return nn.Dense(
            self.embed_dim,
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            kernel_init=with_axes(nn.initializers.normal(cfg.width**-0.5), "embed", "proj"),
        )

    def _vision(self, images: jax.Array, train: bool, return_tokens: bool = False) -> Any:
        images = normalize_pixels(images, self.image_mean, self.image_std)  # every image input's one place
        if self.stateful:
            return self.vision_model(images, train=train, return_tokens=return_tokens)
        return self.vision_model(images, return_tokens=return_tokens)

    def encode_image(self, images: jax.Array) -> jax.Array:
        return l2_normalize(self.visual_projection(self._vision(images, train=False)))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return l2_normalize(self.text_projection(self.text_model(tokens)))

    def image_tokens(self, images: jax.Array) -> jax.Array:
        """The vision tower's tokens [B, N, vision_token_width]: the ViT's patch tokens of the last
        block (no class token), the ResNet's last feature map's positions."""
        return self._vision(images, train=False, return_tokens=True)[1]

    def text_tokens(self, tokens: jax.Array) -> jax.Array:
        """The text tower's final_layer_norm output at every position [B, L, text width]."""
        return self.text_model(tokens, return_tokens=True)[1]

    def text_valid(self, tokens: jax.Array) -> jax.Array:
        """bool [B, L]: the caption through its end-of-text token (the positions that are not padding)."""
        eot = jnp.argmax(tokens == self.eos_id, axis=-1)
        return jnp.arange(tokens.shape[1])[None, :] <= eot[:, None]

    def scale(self) -> jax.Array:
        return jnp.minimum(jnp.exp(self.logit_scale), self.logit_scale_max)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, Any]:
        return {
            "image_embeds": self.encode_image(images),
            "text_embeds": self.encode_text(tokens),
            "logit_scale": self.scale(),
        }

    def _image(self, images: jax.Array, want: set[str], train: bool) -> dict[str, jax.Array]:
        out = {}
        if "tokens" in want:
            pooled, out["tokens"] = self._vision(images, train, return_tokens=True)
        else:
            pooled = self._vision(images, train)
        out["pooled"] = pooled
        if want & {"embeds", "projected"}:
            out["projected"] = self.visual_projection(pooled)
            out["embeds"] = l2_normalize(out["projected"])
        return {k: v for k, v in out.items() if k in want}

    def _text(self, tokens: jax.Array, want: set[str]) -> dict[str, jax.Array]:
        out = {}
        if "tokens" in want:
            pooled, out["tokens"] = self.text_model(tokens, return_tokens=True)
        else:
            pooled = self.text_model(tokens)
        if "embeds" in want:
            out["embeds"] = l2_normalize(self.text_projection(pooled))
        return out

    def outputs(
        self, batch: Mapping[str, jax.Array], needs: tuple[str, ...], train: bool = True
    ) -> dict[str, Any]:
        """The OUTPUTS named in `needs`, computed from a training batch (veclip_jax/batch.py keys).

        `train`: a ResNet normalises with the batch's statistics and updates its running averages
        (apply with mutable=["batch_stats"]); the image and each view are separate batches to it.
        """
        unknown = set(needs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown model outputs {sorted(unknown)}: the towers give {OUTPUTS}")
        want = lambda prefix: {n.split("_", 1)[1] for n in needs if n.startswith(prefix + "_")}
        out: dict[str, Any] = {}
        if w := want("image"):
            out.update({f"image_{k}": v for k, v in self._image(batch["image"], w, train).items()})
        if w := want("view"):
            views = [self._image(batch["views"][:, v], w, train) for v in range(batch["views"].shape[1])]
            out.update({f"view_{k}": tuple(v[k] for v in views) for k in w})
        for prefix, key in TEXT_INPUTS.items():
            if w := want(prefix) - {"valid"}:
                out.update({f"{prefix}_{k}": v for k, v in self._text(batch[key], w).items()})
        if "text_valid" in needs:
            out["text_valid"] = self.text_valid(batch["tokens"])
        if "logit_scale" in needs:
            out["logit_scale"] = self.scale()
        return out


def build_model(model_cfg: Any, *, unroll: bool = False, logit_scale_init: float | None = None) -> CLIP:
    """The towers for a config's `model` section (veclip_jax/defaults.py), checked by veclip_jax/config.py.

    `logit_scale_init` replaces `model_cfg.logit_scale_init` (an objective's own
    temperature start: SigLIP's log 10). `unroll` unrolls the layer scans: same
    parameters and math, slower to compile; XLA's cost analysis counts a
    scanned body once, an unrolled one per layer.
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
    # A model config saved before these fields existed normalised with CLIP's statistics.
    mean = tuple(float(x) for x in v.get("image_mean", CLIP_MEAN))
    std = tuple(float(x) for x in v.get("image_std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"model.vision.image_mean={mean} / image_std={std}: 3 values each, std > 0")
    if v.get("type", "vit") == "resnet":
        vision = ResNetConfig(
            layers=tuple(v.resnet_layers),
            width=v.width,
            heads=v.heads,
            image_size=v.image_size,
            embed_dim=model_cfg.embed_dim,
            dtype=common["dtype"],
            remat=model_cfg.remat,
            unroll=unroll,
        )
    else:
        vision = TransformerConfig(v.width, v.layers, v.heads, v.mlp_dim, causal=False, **common)
    return CLIP(
        vision=vision,
        text=TransformerConfig(t.width, t.layers, t.heads, t.mlp_dim, causal=True, **common),
        image_size=v.image_size,
        patch_size=v.patch_size,
        vocab_size=t.vocab_size,
        context_length=t.context_length,
        eos_id=t.eos_id,
        embed_dim=model_cfg.embed_dim,
        logit_scale_init=model_cfg.logit_scale_init if logit_scale_init is None else logit_scale_init,
        logit_scale_max=model_cfg.logit_scale_max,
        image_mean=mean,
        image_std=std,
    )
