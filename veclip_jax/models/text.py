"""The text tower: causal pre-LN transformer pooled at the end-of-text token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from veclip_jax.models.layers import Encoder, TransformerConfig, layer_norm, with_axes


class TextEmbeddings(nn.Module):
    cfg: TransformerConfig
    vocab_size: int
    context_length: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        width = self.cfg.width
        tok = self.param(
            "token_embedding",
            with_axes(nn.initializers.normal(0.02), "vocab", "embed"),
            (self.vocab_size, width),
        )
        pos = self.param(
            "position_embedding",
            with_axes(nn.initializers.normal(0.01), "positions", "embed"),
            (self.context_length, width),
        )
        x = jnp.take(tok, tokens, axis=0) + pos[None, : tokens.shape[1]]
        return nn.with_logical_constraint(x.astype(self.cfg.dtype), ("batch", "length", "act_embed"))


class TextTransformer(nn.Module):
    """Tokens [batch, length] -> pooled features [batch, width].

    Pooling takes the *first* end-of-text position, which is what HF
    `CLIPTextModel` does whenever `eos_token_id != 2`. With the causal mask,
    the padding after it cannot reach it, so no padding mask is needed. With
    `return_tokens`, also every position's final_layer_norm output [batch,
    length, width] (FILIP's text tokens, DeCLIP's MLM input).
    """

    cfg: TransformerConfig
    vocab_size: int
    context_length: int
    eos_id: int

    @nn.compact
    def __call__(
        self, tokens: jax.Array, return_tokens: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens, the model holds {self.context_length}")
        x = TextEmbeddings(self.cfg, self.vocab_size, self.context_length, name="embeddings")(tokens)
        x = Encoder(self.cfg, name="encoder")(x)
        x = layer_norm(self.cfg, "final_layer_norm")(x)
        eot = jnp.argmax(tokens == self.eos_id, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        pooled = nn.with_logical_constraint(pooled, ("batch", "act_embed"))
        return (pooled, x) if return_tokens else pooled
