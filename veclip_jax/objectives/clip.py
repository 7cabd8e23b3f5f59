"""CLIP's symmetric InfoNCE with the global batch as negatives.

loss = ( CE(s * I T^T, diag) + CE(s * T I^T, diag) ) / 2, averaged over the
global batch B, with I, T the L2-normalised embeddings and s the logit scale.

On a mesh, each batch shard scores its own rows against the gathered columns
(open_clip's "local loss" with gradients through the gather): every device
holds a [B/n, B] block instead of the [B, B] matrix, and since the row sums
are added up over all shards the value, and its gradient, do not depend on
the mesh. `all_gather` is differentiable (its transpose is a reduce-scatter),
so the gradient reaches the embeddings of every example.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from veclip_jax.objectives.base import Objective
from veclip_jax.parallel.axes import BATCH_AXES


def cross_entropy_sum(
    logits: jax.Array, positive: jax.Array, scale: jax.Array | float, valid: jax.Array | None = None
) -> jax.Array:
    """Sum over rows of CE(scale * logits, positive) = sum_i logsumexp_j(scale * (l_ij - l_i,pos(i))).

    `logits` [b, C] unscaled (cosines), `positive` [b, C] bool marking each
    row's one positive column, `scale` > 0, `valid` [b, C] bool (None: all)
    the columns a row may see (SLIP's anchor does not see itself). This is
    open_clip's `cross_entropy` of the scaled logits.

    The positive is subtracted inside the logsumexp, from the row's own
    entry, so its term is exactly 0: the textbook `logsumexp(s * l) - s *
    l_pos` subtracts two numbers of size s (100) to get one near 0 and
    loses float32's last digits (a saturated batch came out negative,
    -1.6e-6). The logsumexp itself is taken as m + log1p(expm1(-m) + the
    other terms), m the row's max (>= 0, the positive's term being 0): when
    the positive leads, that is log1p of the negatives' mass, exact to
    float32's relative precision however small it is, where log(1 + mass)
    would round it away. Every row is >= 0, also in float32. Columns not
    `valid` are masked after scaling (never -inf * 0 in a gradient).
    """
    d = scale * (logits - jnp.sum(jnp.where(positive, logits, 0.0), axis=-1, keepdims=True))
    if valid is not None:
        d = jnp.where(valid, d, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(d, axis=-1))  # the value is an identity in m: no gradient needed
    others = jnp.sum(jnp.where(positive, 0.0, jnp.exp(d - m[:, None])), axis=-1)
    return jnp.sum(m + jnp.log1p(jnp.expm1(-m) + others))


def _terms(
    img: jax.Array,
    txt: jax.Array,
    img_all: jax.Array,
    txt_all: jax.Array,
    scale: jax.Array,
    offset: jax.Array | int,
) -> dict[str, jax.Array]:
    """Sums over local rows `img`/`txt` whose positives sit at `offset + i` in the gathered arrays."""
    b = img.shape[0]
    labels = offset + jnp.arange(b)
    positive = labels[:, None] == jnp.arange(txt_all.shape[0])[None, :]  # [b, B]
    sim_i2t = img @ txt_all.T  # [b, B]
    sim_t2i = txt @ img_all.T
    pos = jnp.sum(jnp.where(positive, sim_i2t, 0.0))  # the diagonal, as the logits have it
    return {
        "loss": cross_entropy_sum(sim_i2t, positive, scale) + cross_entropy_sum(sim_t2i, positive, scale),
        "i2t_correct": jnp.sum(jnp.argmax(sim_i2t, axis=-1) == labels),
        "t2i_correct": jnp.sum(jnp.argmax(sim_t2i, axis=-1) == labels),
        "pos_sim": pos,
        "all_sim": jnp.sum(sim_i2t),
    }


def _finish(
    sums: dict[str, jax.Array], batch: int, scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    # Counts as Python floats: an int such as B * (B - 1) would reach JAX as an int32, which
    # overflows from B = 46,341 (CLIP runs at 64k pairs); as a float it is exact to 2**53.
    loss = sums["loss"] / float(2 * batch)
    metrics = {
        "loss": loss,
        "i2t_accuracy": sums["i2t_correct"] / float(batch),
        "t2i_accuracy": sums["t2i_correct"] / float(batch),
        "logit_scale": scale,
        "positive_similarity": sums["pos_sim"] / float(batch),
        "negative_similarity": (sums["all_sim"] - sums["pos_sim"]) / float(max(batch * (batch - 1), 1)),
    }
    return loss, metrics


def clip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array,
    *,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the whole (global) batch, and its metrics.

    Args:
      image_embeds, text_embeds: [B, D] L2-normalised, row i of each a pair.
      logit_scale: the (already exponentiated and clipped) scale s.
      mesh: when given, the embeddings are taken as sharded over `batch_axes`
        and the loss is computed blockwise per shard (see module doc).
    Returns:
      (loss, metrics): loss, i2t/t2i batch accuracy, logit_scale, mean
      positive and negative cosine similarity.
    """
    img = image_embeds.astype(jnp.float32)
    txt = text_embeds.astype(jnp.float32)
    scale = jnp.asarray(logit_scale, jnp.float32)
    batch = img.shape[0]
    if mesh is None:
        return _finish(_terms(img, txt, img, txt, scale, 0), batch, scale)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(batch_axes), P(batch_axes), P()), out_specs=P())
    def blockwise(img, txt, scale):
        img_all = jax.lax.all_gather(img, batch_axes, tiled=True)
        txt_all = jax.lax.all_gather(txt, batch_axes, tiled=True)
        offset = jax.lax.axis_index(batch_axes) * img.shape[0]
        sums = _terms(img, txt, img_all, txt_all, scale, offset)
        return jax.tree.map(lambda x: jax.lax.psum(x, batch_axes), sums)

    return _finish(blockwise(img, txt, scale), batch, scale)


@dataclasses.dataclass(frozen=True)
class ClipObjective(Objective):
    """CLIP's symmetric InfoNCE as an objective: pooled embeddings and the model's logit scale only."""

    name: str = "clip"

    def __call__(
        self, outputs: Any, batch: Any, *, mesh: Mesh | None = None, state: Any = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return clip_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], mesh=mesh)
