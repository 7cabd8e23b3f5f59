"""Building blocks of the objectives' own parameters (`params["objective"]`).

Every kernel names logical axes ("embed" for an input width, "mlp" for a hidden
width, "vocab", "proj" for a head's output), so the one set of sharding rules
places heads like the towers. Heads serve training: export drops them
(hf/to_hf.py), and evaluation runs only FILIP's token mappings (its
token-wise scoring, eval/tokenwise.py).

Batch normalisation in the heads (SLIP's SimCLR MLP, DeCLIP's SimSiam) uses
the statistics of the *global* batch, on every step, and keeps no running
averages. The DeCLIP toolkit's SimSiam heads use per-GPU BatchNorm (SLIP's use
SyncBN): per-GPU statistics would make the loss depend on how the batch is
split over devices, which we refuse (the same math on any mesh). Under jit the
mean over the sharded batch axis is a global reduction that XLA inserts, so
this is SyncBN at no extra code. No running statistics are needed because the
batch-normalised heads are never evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from veclip_jax.models.layers import with_axes


class ScalarParams(nn.Module):
    """Named scalar parameters (SigLIP's bias, FILIP's dense temperature); returns them as a dict."""

    inits: tuple[tuple[str, float], ...]

    @nn.compact
    def __call__(self, *_: Any) -> dict[str, jax.Array]:
        return {name: self.param(name, with_axes(nn.initializers.constant(v)), ()) for name, v in self.inits}


def dense(
    features: int, in_axis: str, out_axis: str, *, use_bias: bool = True, name: str | None = None
) -> nn.Dense:
    """A float32 Dense layer whose kernel is [in_axis, out_axis] in logical names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=with_axes(nn.initializers.lecun_normal(), in_axis, out_axis),
        bias_init=with_axes(nn.initializers.zeros_init(), out_axis),
        name=name,
    )


class GlobalBatchNorm(nn.Module):
    """BatchNorm over the batch axis of [B, F] with the global batch's statistics, no running averages."""

    axis_name: str = "mlp"
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=0)
        var = jnp.mean(jnp.square(x - mean), axis=0)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        f = x.shape[-1]
        if self.use_scale:
            y = y * self.param("scale", with_axes(nn.initializers.ones_init(), self.axis_name), (f,))
        if self.use_bias:
            y = y + self.param("bias", with_axes(nn.initializers.zeros_init(), self.axis_name), (f,))
        return y


class MLP(nn.Module):
    """Linear -> [BN] -> ReLU ... -> Linear [-> BN]: the SimCLR / SimSiam head shape.

    `widths` are the output widths of the layers; the hidden ones are followed
    by global-batch BN (when `hidden_bn`) and ReLU, the last by BN only when
    `out_bn`. Biases are dropped where a BN follows (it would cancel them).
    `in_axis` names the input width (not "mlp": the first kernel's output is).
    """

    widths: Sequence[int]
    hidden_bn: bool = True
    out_bn: bool = False
    in_axis: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        last = len(self.widths) - 1
        for i, w in enumerate(self.widths):
            out_axis = "proj" if i == last else "mlp"
            # A kernel names two different axes: hidden -> hidden is [embed (fsdp), mlp (tensor)].
            in_axis = self.in_axis if i == 0 else ("mlp" if i == last else "embed")
            bn = self.out_bn if i == last else self.hidden_bn
            x = dense(w, in_axis, out_axis, use_bias=not bn, name=f"dense_{i}")(x)
            if bn:
                x = GlobalBatchNorm(axis_name=out_axis, name=f"bn_{i}")(x)
            if i != last:
                x = nn.relu(x)
        return x
