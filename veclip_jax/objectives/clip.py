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
    sim_i2t = img @ txt_all.T  # [b, B]
    sim_t2i = txt @ img_all.T
    pos = jnp.sum(img * txt, axis=-1)  # the diagonal, = sim_i2t[i, labels[i]]
    lse_i2t = jax.nn.logsumexp(scale * sim_i2t, axis=-1)
    lse_t2i = jax.nn.logsumexp(scale * sim_t2i, axis=-1)
    return {
        "loss": jnp.sum(lse_i2t + lse_t2i - 2 * scale * pos),
        "i2t_correct": jnp.sum(jnp.argmax(sim_i2t, axis=-1) == labels),
        "t2i_correct": jnp.sum(jnp.argmax(sim_t2i, axis=-1) == labels),
        "pos_sim": jnp.sum(pos),
        "all_sim": jnp.sum(sim_i2t),
    }


def _finish(
    sums: dict[str, jax.Array], batch: int, scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss = sums["loss"] / (2 * batch)
    metrics = {
        "loss": loss,
        "i2t_accuracy": sums["i2t_correct"] / batch,
        "t2i_accuracy": sums["t2i_correct"] / batch,
        "logit_scale": scale,
        "positive_similarity": sums["pos_sim"] / batch,
        "negative_similarity": (sums["all_sim"] - sums["pos_sim"]) / max(batch * (batch - 1), 1),
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
