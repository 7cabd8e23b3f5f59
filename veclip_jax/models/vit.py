"""The image tower: CLIP's ViT, named as HF `CLIPVisionModel` names it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from veclip_jax.models.layers import Encoder, TransformerConfig, layer_norm, with_axes


class VisionEmbeddings(nn.Module):
    """Patch conv (no bias) -> [class token; patches] + learned positions."""

    cfg: TransformerConfig
    image_size: int
    patch_size: int

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg, p = self.cfg, self.patch_size
        scale = cfg.width**-0.5
        x = nn.Conv(
            cfg.width,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            kernel_init=with_axes(nn.initializers.normal(0.02), "patch_h", "patch_w", "channels", "embed"),
            name="patch_embedding",
        )(images.astype(cfg.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.width)
        cls = self.param("class_embedding", with_axes(nn.initializers.normal(scale), "embed"), (cfg.width,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.width)), x], axis=1)
        pos = self.param(
            "position_embedding",
            with_axes(nn.initializers.normal(scale), "positions", "embed"),
            ((self.image_size // p) ** 2 + 1, cfg.width),
        )
        return nn.with_logical_constraint(x + pos.astype(x.dtype)[None], ("batch", "length", "act_embed"))


class VisionTransformer(nn.Module):
    """Images [batch, size, size, 3] (normalised) -> pooled features [batch, width].

    pre-LN on the embedded sequence, pre-LN blocks, LayerNorm on the class
    token. The projection lives in the two-tower model, as in HF. With
    `return_tokens`, also the patch tokens [batch, patches, width] of the last
    block (no class token, before post_layernorm: FILIP's image tokens).
    """

    cfg: TransformerConfig
    image_size: int
    patch_size: int

    @nn.compact
    def __call__(
        self, images: jax.Array, return_tokens: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images are {images.shape[1:3]}, the model expects {self.image_size}px")
        x = VisionEmbeddings(self.cfg, self.image_size, self.patch_size, name="embeddings")(images)
        x = layer_norm(self.cfg, "pre_layrnorm")(x)  # sic: HF's spelling
        x = Encoder(self.cfg, name="encoder")(x)
        pooled = layer_norm(self.cfg, "post_layernorm")(x[:, 0])
        pooled = nn.with_logical_constraint(pooled, ("batch", "act_embed"))
        return (pooled, x[:, 1:]) if return_tokens else pooled
