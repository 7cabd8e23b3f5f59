"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023), over the global batch, chunked.

  loss = -1/B * sum_{i,j} log sigmoid( z_ij * (t * x_i . y_j + b) ),  z_ij = 1 if i == j else -1

with x, y the L2-normalised image / text embeddings, t = exp(t') the learned
temperature (t' is the model's `logit_scale` parameter, initialised at log 10)
and b a learned bias (initialised at -10), owned by this objective
(`params["objective"]["bias"]`).

Every pair is an independent binary term, so no softmax couples a row to the
whole batch: on a mesh each device scores its own image rows against one
block of texts at a time and passes the text block on to its neighbour with
`ppermute` (big_vision's "chunked" sigmoid loss). After n hops (n = batch
shards) every image has met every text, no device ever held more than a
[B/n, D] text block or a [B/n, B/n] logit block, and the sums, so the value
and its gradient, equal the dense formula's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from veclip_jax.objective_fields import SigLipFields
from veclip_jax.objectives.base import Objective, TowerDims
from veclip_jax.objectives.heads import ScalarParams
from veclip_jax.parallel.axes import BATCH_AXES


def _block_terms(
    img: jax.Array, txt: jax.Array, t: jax.Array, b: jax.Array, positives: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One block: (sum of -log sigmoid terms, sum of negative sims, row / column max of negative sims)."""
    sims = img @ txt.T
    logits = t * sims + b
    if positives:
        eye = jnp.eye(sims.shape[0], dtype=bool)
        z = jnp.where(eye, 1.0, -1.0)
        neg = jnp.where(eye, -jnp.inf, sims)
        neg_sum = jnp.sum(jnp.where(eye, 0.0, sims))
    else:
        z, neg, neg_sum = -1.0, sims, jnp.sum(sims)
    loss = -jnp.sum(jax.nn.log_sigmoid(z * logits))
    return loss, neg_sum, jnp.max(neg, axis=1), jnp.max(neg, axis=0)


def _finish(
    loss_sum: jax.Array,
    pos: jax.Array,
    neg_sum: jax.Array,
    i2t_correct: jax.Array,
    t2i_correct: jax.Array,
    batch: int,
    t: jax.Array,
    b: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    # Counts as Python floats: B * (B - 1) as an int reaches JAX as an int32, which overflows from
    # B = 46,341 (SigLIP runs at up to 1M pairs); as a float it is exact to 2**53.
    loss = loss_sum / float(batch)
    metrics = {
        "loss": loss,
        "i2t_accuracy": i2t_correct / float(batch),
        "t2i_accuracy": t2i_correct / float(batch),
        "logit_scale": t,
        "logit_bias": b,
        "positive_similarity": pos / float(batch),
        "negative_similarity": neg_sum / float(max(batch * (batch - 1), 1)),
    }
    return loss, metrics


def siglip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    temperature: jax.Array,
    bias: jax.Array,
    *,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sigmoid loss over the whole (global) batch, and its metrics.

    Args:
      image_embeds, text_embeds: [B, D] L2-normalised, row i of each a pair.
      temperature: t (already exponentiated); bias: b.
      mesh: when given, the embeddings are taken as sharded over `batch_axes`
        and the loss is computed by passing text blocks round (module doc).
    Returns:
      (loss, metrics): loss, i2t/t2i batch accuracy (the positive beats every
      negative), logit_scale (t), logit_bias, mean positive / negative cosine.
    """
    img = image_embeds.astype(jnp.float32)
    txt = text_embeds.astype(jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)
    b = jnp.asarray(bias, jnp.float32)
    batch = img.shape[0]
    if mesh is None:
        loss, neg_sum, row_max, col_max = _block_terms(img, txt, t, b, positives=True)
        pos_sims = jnp.sum(img * txt, axis=-1)
        i2t = jnp.sum(pos_sims > row_max)
        t2i = jnp.sum(pos_sims > col_max)
        return _finish(loss, jnp.sum(pos_sims), neg_sum, i2t, t2i, batch, t, b)

    n = math.prod(mesh.shape[a] for a in batch_axes)
    ring = [(i, (i + 1) % n) for i in range(n)]

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(batch_axes), P(batch_axes), P(), P()), out_specs=P()
    )
    def chunked(img: jax.Array, txt: jax.Array, t: jax.Array, b: jax.Array) -> tuple[jax.Array, ...]:
        # Hop 0: the device's own texts, with the positives on the diagonal.
        loss, neg_sum, row_max, col_max = _block_terms(img, txt, t, b, positives=True)
        pos_sims = jnp.sum(img * txt, axis=-1)

        def hop(carry: tuple, _: None) -> tuple[tuple, None]:
            # The text block travels with its running column maxima (for t2i accuracy).
            blk, blk_col_max, loss, neg_sum, row_max = carry
            blk, blk_col_max = jax.lax.ppermute((blk, blk_col_max), batch_axes, ring)
            l_, s_, r_, c_ = _block_terms(img, blk, t, b, positives=False)
            carry = (blk, jnp.maximum(blk_col_max, c_), loss + l_, neg_sum + s_, jnp.maximum(row_max, r_))
            return carry, None

        if n > 1:
            carry = (txt, col_max, loss, neg_sum, row_max)
            (_, col_max, loss, neg_sum, row_max), _ = jax.lax.scan(hop, carry, None, length=n - 1)
            # After n-1 hops device d holds the block of d+1: one more hop brings its maxima home.
            col_max = jax.lax.ppermute(col_max, batch_axes, ring)
        sums = (
            loss,
            jnp.sum(pos_sims),
            neg_sum,
            jnp.sum(pos_sims > row_max),
            jnp.sum(pos_sims > col_max),
        )
        return tuple(jax.lax.psum(x, batch_axes) for x in sums)

    return _finish(*chunked(img, txt, t, b), batch, t, b)


@dataclasses.dataclass(frozen=True)
class SigLipObjective(SigLipFields, Objective):
    """The sigmoid loss as an objective: pooled embeddings, the temperature and its own bias."""

    name: str = "siglip"
    needs: tuple[str, ...] = ("image_embeds", "text_embeds", "logit_scale", "objective")
    gauges: tuple[str, ...] = ("logit_scale", "logit_bias")

    def heads(self, dims: TowerDims) -> ScalarParams:
        return ScalarParams((("bias", self.bias_init),))

    @property
    def logit_scale_init(self) -> float | None:
        return self.temperature_init

    def __call__(
        self, outputs: Any, batch: Any, *, mesh: Mesh | None = None, state: Any = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        bias = outputs["objective"]["bias"]
        return siglip_loss(
            outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], bias, mesh=mesh
        )
