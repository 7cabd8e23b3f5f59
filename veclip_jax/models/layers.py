"""Transformer pieces shared by both towers: pre-LN blocks, scanned over depth.

Why Linen rather than NNX: the towers are scanned over depth with remat
(`nn.scan` + `nn.remat`, with the stacked axis named for sharding), the
parameters are a plain nested dict that Orbax, optax masks and the HF export
table consume directly, and the train step is an ordinary `jax.jit` of
(state, batch). Linen does all three with stable APIs in flax 0.12; NNX would
add a graph split/merge layer around each of them for no gain here.

Parameter names follow HF `CLIPModel` one-to-one (`self_attn/q_proj`,
`layer_norm1`, `mlp/fc1`, ...): the export is then a table of reshapes and
transposes. Every parameter carries logical axis names; which mesh axes they
map to is decided in `veclip_jax.parallel.rules`, never here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype
Initializer = Callable[..., jax.Array]


def with_axes(init: Initializer, *names: str | None) -> Initializer:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, x * sigmoid(1.702 x) (HF "quick_gelu")."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    """The erf GELU (HF "gelu"); flax's default is the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of `x` over their L2 norm, in float32: embeddings, tokens, queues all use this one.

    A row whose norm is below `eps` is divided by `eps` instead (a zero row,
    e.g. a padded token, stays zero with a zero gradient).
    """
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))

# What a block keeps for the backward pass; the rest is recomputed. "dots"
# keeps matmul outputs and recomputes norms, activations and softmax;
# "dots_no_batch" also recomputes attention's score matmuls (batched dots);
# "full" keeps only the block's input. Measured for B/16 at batch 8 on the
# 2-core CPU: none 6.1 s/step, dots 5.6-5.7, dots_no_batch 5.6-5.8, full 6.4.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The shape of one tower's transformer stack."""

    width: int
    layers: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32  # compute dtype; parameters are float32
    remat: str = "none"  # a key of REMAT_POLICIES
    causal: bool = False
    unroll: bool = False  # unroll the layer scan (XLA then counts every layer's FLOPs)
    attention: str = "auto"  # "auto", "xla" or "cudnn": see `attention_implementation`


def layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.dtype,
        param_dtype=jnp.float32,
        scale_init=with_axes(nn.initializers.ones, "norm"),
        bias_init=with_axes(nn.initializers.zeros, "norm"),
        name=name,
    )


def attention_implementation(choice: str, dtype: Dtype) -> str | None:
    """The `implementation` for jax.nn.dot_product_attention.

    In jax 0.10 `implementation=None` always means XLA's unfused attention;
    the fused cuDNN flash-attention kernel must be asked for by name, and it
    takes only half-precision inputs. "auto" asks for it on a GPU in bf16/fp16
    (falling back to XLA for shapes cuDNN refuses), XLA elsewhere.
    """
    if choice == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and jax.default_backend() == "gpu" else None
    return None if choice == "xla" else choice


class HeadsDense(nn.Module):
    """x @ kernel + bias with per-head kernel shapes, named as HF's Linear.

    `in_axes` -> "to input", `out_axes` -> "to output"; e.g. q_proj maps
    [..., embed] -> [..., heads, kv], out_proj [..., heads, kv] -> [..., embed].
    (flax's DenseGeneral initialises a flattened kernel, which breaks the
    logical-axis metadata of a 3-D kernel; an einsum keeps it simple.)
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    std: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            with_axes(nn.initializers.normal(self.std), *self.in_axes, *self.out_axes),
            (*self.in_shape, *self.out_shape),
        )
        bias = self.param("bias", with_axes(nn.initializers.zeros, *self.out_axes), self.out_shape)
        n_in = len(self.in_shape)
        contract = list(range(x.ndim - n_in, x.ndim))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), ((contract, list(range(n_in))), ((), ()))
        )
        return y + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with per-head q/k/v kernels [embed, heads, kv]."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        head_dim = cfg.width // cfg.heads
        # OpenAI CLIP's init: width^-0.5 for the input projections, scaled by
        # (2 * layers)^-0.5 for the output one.
        std_in = cfg.width**-0.5
        std_out = std_in * (2 * cfg.layers) ** -0.5
        heads = (cfg.heads, head_dim)

        def proj(name: str) -> HeadsDense:
            return HeadsDense((cfg.width,), heads, ("embed",), ("heads", "kv"), std_in, cfg.dtype, name=name)

        q, k, v = (proj(n)(x) for n in ("q_proj", "k_proj", "v_proj"))  # [batch, length, heads, head_dim]
        impl = attention_implementation(cfg.attention, cfg.dtype)
        try:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=cfg.causal, implementation=impl)
        except (ValueError, NotImplementedError) as e:
            if cfg.attention != "auto" or impl is None:
                raise
            logging.warning("cuDNN attention refused %s (%s): using XLA's", q.shape, e)
            out = jax.nn.dot_product_attention(q, k, v, is_causal=cfg.causal)
        out_proj = HeadsDense(
            heads, (cfg.width,), ("heads", "kv"), ("embed",), std_out, cfg.dtype, name="out_proj"
        )
        return out_proj(out)


class Mlp(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        std_fc1 = (2 * cfg.width) ** -0.5
        std_fc2 = cfg.width**-0.5 * (2 * cfg.layers) ** -0.5
        x = nn.Dense(
            cfg.mlp_dim,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            kernel_init=with_axes(nn.initializers.normal(std_fc1), "embed", "mlp"),
            bias_init=with_axes(nn.initializers.zeros, "mlp"),
            name="fc1",
        )(x)
        x = ACTIVATIONS[cfg.act](x)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_mlp"))
        return nn.Dense(
            cfg.width,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            kernel_init=with_axes(nn.initializers.normal(std_fc2), "mlp", "embed"),
            bias_init=with_axes(nn.initializers.zeros, "embed"),
            name="fc2",
        )(x)


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x)). Shaped for nn.scan."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        x = x + Attention(self.cfg, name="self_attn")(layer_norm(self.cfg, "layer_norm1")(x))
        x = x + Mlp(self.cfg, name="mlp")(layer_norm(self.cfg, "layer_norm2")(x))
        return x, None


class Encoder(nn.Module):
    """`layers` EncoderLayers as one scanned layer with a stacked leading axis.

    Scanning keeps compile time flat in depth; the stacked axis is named
    "layers" so the sharding rules can leave it whole.
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer = EncoderLayer
        if self.cfg.remat != "none":
            layer = nn.remat(layer, prevent_cse=False, policy=REMAT_POLICIES[self.cfg.remat])
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.cfg.layers,
            unroll=self.cfg.layers if self.cfg.unroll else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(self.cfg, name="layers")(x, None)
        return x
