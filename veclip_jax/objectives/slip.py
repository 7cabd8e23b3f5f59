"""SLIP (Mu et al., 2022): CLIP + SimCLR's NT-Xent on two augmented views, over the global batch.

`SlipObjective` (the seam's objective): CLIP's loss on the standard crop plus
`ssl_weight` x NT-Xent between the two MoCoV2 views' SimCLR embeddings (an MLP
head, `SlipHeads`, on each view's pre-projection class token). The term:

For two views z1, z2 [B, D] of the same B images, L2-normalised (in float32),
every one of the 2B embeddings is an anchor. Its positive is the other view
of the same image; its negatives are the other 2B - 2 embeddings of both
views (its own-view self-similarity is excluded, and the positive is not
counted twice). With logits s = cos / tau:

  loss = 1/(2B) * sum_{anchors k} ( logsumexp_{j != k} s_kj - s_{k, pos(k)} )

Written the SLIP way, for the anchors of view a: logits_ab = a b^T / tau with
the positive on the diagonal, logits_aa = a a^T / tau with the diagonal
masked, CE over [logits_ab, logits_aa]; likewise from view b, both averaged.
This is the DeCLIP toolkit's `NT_Xent_gather` (positive first, negatives =
everything but the anchor's own two entries) and facebookresearch/SLIP's
`SIMCLRLoss`, which are the same sum.

On a mesh (`mesh` given) each batch shard scores its own anchor rows against
the all-gathered columns of both views, exactly like clip.py: a [B/n, 2B]
block per device, positives at `shard offset + i`, and the per-shard sums
added with `psum`, so the value and its gradient do not depend on the mesh
(the gather is differentiable; its transpose is a reduce-scatter).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from veclip_jax.models.layers import l2_normalize
from veclip_jax.objective_fields import SlipFields
from veclip_jax.objectives.base import Objective, TowerDims
from veclip_jax.objectives.clip import clip_loss, cross_entropy_sum
from veclip_jax.objectives.heads import MLP
from veclip_jax.parallel.axes import BATCH_AXES


def _terms(
    a: jax.Array,
    b: jax.Array,
    a_all: jax.Array,
    b_all: jax.Array,
    inv_tau: jax.Array,
    offset: jax.Array | int,
) -> dict[str, jax.Array]:
    """Sums over the local anchors `a`, `b` whose own rows sit at `offset + i` in the gathered arrays."""
    n = a.shape[0]
    labels = offset + jnp.arange(n)
    own = labels[:, None] == jnp.arange(a_all.shape[0])[None, :]  # [n, B]: the anchor itself
    positive = jnp.concatenate([own, jnp.zeros_like(own)], axis=1)  # [n, 2B]: the other view's row
    valid = jnp.concatenate([jnp.ones_like(own), ~own], axis=1)  # every column but the anchor itself

    def one_view(q: jax.Array, q_all: jax.Array, k_all: jax.Array) -> tuple[jax.Array, ...]:
        # Anchors q; positives: the other view's same rows; columns: the other view, then q's view minus q.
        logits = jnp.concatenate([q @ k_all.T, q @ q_all.T], axis=1)  # [n, 2B] cosines, positive at labels[i]
        loss = cross_entropy_sum(logits, positive, inv_tau, valid)  # positive subtracted inside (clip.py)
        correct = jnp.sum(jnp.argmax(jnp.where(valid, logits, -jnp.inf), axis=-1) == labels)
        return loss, correct

    loss_a, correct_a = one_view(a, a_all, b_all)
    loss_b, correct_b = one_view(b, b_all, a_all)
    return {"loss": loss_a + loss_b, "correct": correct_a + correct_b}


def nt_xent_loss(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float | jax.Array,
    *,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimCLR's NT-Xent of two views over the whole (global) batch, and its metrics.

    Args:
      z1, z2: [B, D] embeddings of the two views (row i of each the same
        image), not yet normalised: they are L2-normalised here, in float32.
      temperature: tau; the logits are cosine / tau (SLIP and DeCLIP: 0.1).
      mesh: when given, the embeddings are taken as sharded over `batch_axes`
        and the loss is computed blockwise per shard (see module doc).
    Returns:
      (loss, metrics): loss (mean over the 2B anchors), and metrics
      "ssl_loss" (the same value) and "ssl_accuracy" (the fraction of the 2B
      anchors whose positive is the largest of their 2B - 1 logits).
    """
    a = l2_normalize(z1)
    b = l2_normalize(z2)
    inv_tau = 1.0 / jnp.asarray(temperature, jnp.float32)
    batch = a.shape[0]
    if mesh is None:
        sums = _terms(a, b, a, b, inv_tau, 0)
    else:

        @functools.partial(
            jax.shard_map, mesh=mesh, in_specs=(P(batch_axes), P(batch_axes), P()), out_specs=P()
        )
        def blockwise(a: jax.Array, b: jax.Array, inv_tau: jax.Array) -> dict[str, jax.Array]:
            a_all = jax.lax.all_gather(a, batch_axes, tiled=True)
            b_all = jax.lax.all_gather(b, batch_axes, tiled=True)
            offset = jax.lax.axis_index(batch_axes) * a.shape[0]
            sums = _terms(a, b, a_all, b_all, inv_tau, offset)
            return jax.tree.map(lambda x: jax.lax.psum(x, batch_axes), sums)

        sums = blockwise(a, b, inv_tau)
    loss = sums["loss"] / float(2 * batch)  # a float: no int32 count reaches JAX (clip.py)
    return loss, {"ssl_loss": loss, "ssl_accuracy": sums["correct"] / float(2 * batch)}


class SlipHeads(nn.Module):
    """SLIP's SimCLR head on the pre-projection class token of each view: MLP width -> 4096 -> 4096 -> 256."""

    mlp_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, outputs: Any) -> dict[str, Any]:
        mlp = MLP((self.mlp_dim, self.mlp_dim, self.out_dim), hidden_bn=True, out_bn=False, name="ssl_mlp")
        return {"ssl": tuple(mlp(h) for h in outputs["view_pooled"])}


@dataclasses.dataclass(frozen=True)
class SlipObjective(SlipFields, Objective):
    """SLIP: CLIP on the standard crop + weight x SimCLR (NT-Xent) on two MoCoV2 views (OBJECTIVES.md A.4)."""

    name: str = "slip"
    needs: tuple[str, ...] = ("image_embeds", "text_embeds", "logit_scale", "view_pooled", "objective")
    inputs: tuple[str, ...] = ("image", "tokens", "views")
    views: int = 2
    pooled_only: bool = False

    def heads(self, dims: TowerDims) -> SlipHeads:
        return SlipHeads(self.mlp_dim, self.ssl_dim)

    def __call__(
        self, outputs: Any, batch: Any, *, mesh: Mesh | None = None, state: Any = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        clip, metrics = clip_loss(
            outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], mesh=mesh
        )
        z1, z2 = outputs["objective"]["ssl"]
        ssl, ssl_metrics = nt_xent_loss(z1, z2, self.ssl_temperature, mesh=mesh)
        loss = self.clip_weight * clip + self.ssl_weight * ssl
        return loss, {**metrics, **ssl_metrics, "clip_loss": clip, "loss": loss}
