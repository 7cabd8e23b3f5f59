"""DeCLIP's loss terms (Li et al., 2022), as in the Sense-GVT/DeCLIP toolkit, over the global batch.

  loss = 0.4 * clip_mvs + 0.2 * simsiam + 0.2 * mlm + 0.2 * nn   (YFCC15M configs)

- `clip_mvs_loss` (multi-view supervision): CLIP's symmetric InfoNCE
  (clip.py `clip_loss`) of each image view against each text (caption and
  EDA caption): 2 x 2 = 4 losses, averaged.
- `simsiam_loss` (image self-supervision): -1/2 [cos(p1, sg(z2)) + cos(p2, sg(z1))].
- `mlm_loss` (text self-supervision): cross-entropy of the masked tokens.
- `nn_loss` (nearest-neighbour supervision): image -> text InfoNCE of each
  image view against the queue neighbours of the caption and of the EDA
  caption (one direction only), averaged.
- The text queue, a FIFO of L2-normalised text embeddings kept as state
  (a dict {"queue": [N, D], "ptr": int32}): `queue_init`, `queue_nearest`,
  `queue_push`. One step, in the toolkit's order:

    nn_txt = queue_nearest(state["queue"], txt)      # both neighbours are taken
    nn_eda = queue_nearest(state["queue"], txt_eda)  # before anything is pushed
    state = queue_push(queue_push(state, txt_eda), txt)   # EDA texts first

  Unlike the toolkit, the queue is one global FIFO (float32) fed with the
  whole global batch and searched by every query, where the toolkit keeps
  one float16 bank of 2**16 rows per GPU, fed and searched by that GPU's
  rows only: a global queue of N rows holds the last N / (2 B) steps of the
  whole batch (toolkit: 2**16 / (2 * 128) = 256 steps of each GPU's rows).

`DeclipObjective` puts them through the seam (objectives/base.py): its heads
(`DeclipHeads`: SimSiam projector and predictor, the MLM predictor), its
state (the queue) and the toolkit's weights.

Everything is a pure function of global arrays. The contrastive terms take a
`mesh` and then score local rows against all-gathered columns inside
`shard_map`, like clip.py, so value and gradient do not depend on the mesh;
the row-wise terms (SimSiam, MLM) and the queue need no `shard_map`: written
with plain jnp on global arrays, GSPMD partitions them and the result is the
same on any mesh (see each function).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from veclip_jax.models.layers import l2_normalize, with_axes
from veclip_jax.objective_fields import DeclipFields
from veclip_jax.objectives.base import Objective, TowerDims
from veclip_jax.objectives.clip import clip_loss, cross_entropy_sum
from veclip_jax.objectives.heads import MLP
from veclip_jax.parallel.axes import BATCH_AXES

# --- image self-supervision ---------------------------------------------------------------------


def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array) -> jax.Array:
    """SimSiam's symmetric negative cosine, -1/2 [cos(p1, sg(z2)) + cos(p2, sg(z1))], batch mean.

    Args:
      p1, p2: [B, D] predictor outputs of view 1 and view 2.
      z1, z2: [B, D] projector outputs of the same views; no gradient flows
        into them (stop-gradient, as in SimSiam).
    Returns:
      the loss, in [-1, 1], averaged over the global batch. Row-wise, so it
      is written with plain jnp on global arrays: on a mesh GSPMD computes
      each row where it lives and the mean is a global reduction, the same
      value on any mesh (no shard_map needed).
    """
    z1 = jax.lax.stop_gradient(z1)
    z2 = jax.lax.stop_gradient(z2)

    def cos(p: jax.Array, z: jax.Array) -> jax.Array:
        return jnp.mean(jnp.sum(l2_normalize(p) * l2_normalize(z), axis=-1))

    return -0.5 * (cos(p1, z2) + cos(p2, z1))


# --- text self-supervision ----------------------------------------------------------------------


def mlm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked-token cross-entropy over the labelled positions of the global batch.

    Args:
      logits: [B, L, V] token predictions (may be bfloat16; computed in
        float32 through log_softmax).
      labels: [B, L] int target ids at the masked positions, -1 (any
        negative) elsewhere; unlabelled positions contribute nothing.
    Returns:
      (loss, accuracy): the mean cross-entropy over all labelled positions
      of the batch (sum / count; 0 when nothing is labelled), and the
      fraction of them whose argmax is the label. Row-wise and written on
      global arrays (no shard_map): the sums are global reductions.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    picked = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    loss = -jnp.sum(jnp.where(valid, picked, 0.0)) / denom
    correct = jnp.sum(valid & (jnp.argmax(logp, axis=-1) == labels))
    return loss, correct / denom


# --- the text queue -----------------------------------------------------------------------------


def queue_init(rng: jax.Array, size: int, dim: int) -> dict[str, jax.Array]:
    """A FIFO of `size` random unit vectors of width `dim` (float32), write pointer 0.

    The toolkit seeds its bank the same way (normalised Gaussian vectors).
    """
    queue = l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
    return {"queue": queue, "ptr": jnp.zeros((), jnp.int32)}


def queue_nearest(queue: jax.Array, x: jax.Array) -> jax.Array:
    """For each row of `x`, the queue row of largest cosine (top-1; ties: the lowest index).

    Args:
      queue: [N, D] the queue (its rows are unit vectors; they are
        normalised again for the score only).
      x: [B, D] queries (L2-normalised here).
    Returns:
      [B, D] the selected queue rows as stored, without gradient (the queue
      is state, as the toolkit's detached bank).

    Written on global arrays so GSPMD may shard the queue over its rows (N):
    each similarity is a full contraction over D, which is never split, so
    every device computes the same scores a single device would for its
    queue rows; the argmax over N is then a global reduction (value, then
    lowest index), and the row lookup a global gather, so the result does
    not depend on the mesh. (On TPU the default matmul precision rounds the
    inputs of the scores to bfloat16, so near-ties may resolve differently
    than in float32; the toolkit's bank is float16.)
    """
    scores = l2_normalize(x) @ l2_normalize(queue).T  # [B, N]
    index = jnp.argmax(scores, axis=-1)  # first maximum: the lowest index on ties
    return jnp.take(jax.lax.stop_gradient(queue), index, axis=0)


def queue_push(state: dict[str, jax.Array], x: jax.Array) -> dict[str, jax.Array]:
    """Writes the rows of `x` (stop-gradient, L2-normalised) at ptr, ptr+1, ... modulo N; advances ptr.

    Args:
      state: {"queue": [N, D], "ptr": int32 scalar} (queue_init).
      x: [B, D] the embeddings to enqueue, oldest-first; B need not divide N
        (the write wraps round the end), and when B > N only the last N
        rows survive, as in a FIFO.
    Returns:
      the new state: the queue with the B oldest rows replaced, ptr + B mod N.
    """
    queue, ptr = jnp.asarray(state["queue"]), jnp.asarray(state["ptr"], jnp.int32)
    size = queue.shape[0]
    rows = l2_normalize(jax.lax.stop_gradient(x)).astype(queue.dtype)
    skip = max(rows.shape[0] - size, 0)  # rows overwritten within this very push
    rows = rows[skip:]
    index = (ptr + skip + jnp.arange(rows.shape[0], dtype=jnp.int32)) % size  # distinct: len <= size
    new_ptr = ((ptr + x.shape[0]) % size).astype(jnp.int32)
    return {**state, "queue": queue.at[index].set(rows, unique_indices=True), "ptr": new_ptr}


# --- contrastive terms --------------------------------------------------------------------------


def _nn_sums(
    images: Sequence[jax.Array],
    texts_all: Sequence[jax.Array],
    scale: jax.Array,
    offset: jax.Array | int,
) -> jax.Array:
    """Sum over view x text pairs and local image rows of CE(image -> all texts); positive: its own pair,
    the column `offset + i` of the gathered texts for local row i."""
    total = jnp.zeros((), jnp.float32)
    rows = images[0].shape[0]
    positive = (offset + jnp.arange(rows))[:, None] == jnp.arange(texts_all[0].shape[0])[None, :]
    for img in images:
        for txt_all in texts_all:
            total = total + cross_entropy_sum(img @ txt_all.T, positive, scale)  # stable form: clip.py
    return total


def nn_loss(
    image_views: Sequence[jax.Array],
    nn_texts: Sequence[jax.Array],
    scale: jax.Array | float,
    *,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> jax.Array:
    """DeCLIP's nearest-neighbour term: image -> NN-text InfoNCE, averaged over view x text pairs.

    Args:
      image_views: [B, D] L2-normalised embeddings of each image view.
      nn_texts: [B, D] L2-normalised text sets (the queue neighbours of the
        captions and of the EDA captions), row i paired with image i.
      scale: the (exponentiated, clipped) logit scale, shared with CLIP.
      mesh: when given, the embeddings are taken as sharded over `batch_axes`;
        each shard scores its image rows against the all-gathered text
        columns and the sums are added over shards (as clip.py).
    Returns:
      mean over the len(image_views) x len(nn_texts) pairs of the batch-mean
      cross-entropy, rows = images, columns = the global batch of NN texts,
      positive on the diagonal (one direction only, as the toolkit). The
      gradient reaches whatever it is given; queue_nearest's neighbours
      carry none, as the toolkit's detached bank.
    """
    images = [v.astype(jnp.float32) for v in image_views]
    texts = [t.astype(jnp.float32) for t in nn_texts]
    s = jnp.asarray(scale, jnp.float32)
    batch = images[0].shape[0]
    pairs = len(images) * len(texts)
    count = float(pairs * batch)  # a float: no int32 count reaches JAX (clip.py)
    if mesh is None:
        return _nn_sums(images, texts, s, 0) / count

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(batch_axes), P(batch_axes), P()), out_specs=P())
    def blockwise(images: list[jax.Array], texts: list[jax.Array], s: jax.Array) -> jax.Array:
        texts_all = [jax.lax.all_gather(t, batch_axes, tiled=True) for t in texts]
        offset = jax.lax.axis_index(batch_axes) * images[0].shape[0]
        return jax.lax.psum(_nn_sums(images, texts_all, s, offset), batch_axes)

    return blockwise(images, texts, s) / count


def clip_mvs_loss(
    image_views: Sequence[jax.Array],
    texts: Sequence[jax.Array],
    scale: jax.Array | float,
    *,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DeCLIP's multi-view CLIP loss: clip_loss of every (image view, text) pair, averaged.

    Args:
      image_views: [B, D] L2-normalised embeddings of each image view (DeCLIP: 2).
      texts: [B, D] L2-normalised text embeddings (DeCLIP: caption, EDA caption).
      scale: the (exponentiated, clipped) logit scale.
      mesh: passed to clip_loss (blockwise per shard; value and gradient
        independent of the mesh).
    Returns:
      (loss, metrics): the mean of the len(image_views) x len(texts)
      symmetric InfoNCE losses (toolkit `image_text_two_view`); metrics are
      clip_loss's for the first pair (view 1, caption) under the usual CLIP
      names, except "loss", which is the returned multi-view loss, while
      that pair's own loss is kept as "clip_loss_view1".
    """
    losses = []
    first: dict[str, jax.Array] = {}
    for img in image_views:
        for txt in texts:
            loss, metrics = clip_loss(img, txt, scale, mesh=mesh, batch_axes=batch_axes)
            if not losses:
                first = metrics
            losses.append(loss)
    loss = sum(losses[1:], losses[0]) / len(losses)
    return loss, {**first, "loss": loss, "clip_loss_view1": first["loss"]}


class DeclipHeads(nn.Module):
    """DeCLIP's heads: SimSiam projector and predictor on each view's projected embedding; the MLM predictor.

    Projector D -> 1024 -> 1024 -> 1024 (BN after every layer), predictor
    1024 -> 512 -> 1024 (BN on the hidden layer), as in the toolkit
    (OBJECTIVES.md A.3), with global-batch BN (heads.py); the MLM predictor is
    a Linear(text width -> vocabulary) on the masked caption's token outputs.
    """

    proj_dim: int
    pred_dim: int
    vocab_size: int
    dtype: Any

    @nn.compact
    def __call__(self, outputs: Any) -> dict[str, Any]:
        projector = MLP((self.proj_dim,) * 3, hidden_bn=True, out_bn=True, in_axis="proj", name="projector")
        predictor = MLP((self.pred_dim, self.proj_dim), hidden_bn=True, in_axis="proj", name="predictor")
        z = tuple(projector(x) for x in outputs["view_projected"])
        p = tuple(predictor(x) for x in z)
        mlm = nn.Dense(
            self.vocab_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=with_axes(nn.initializers.normal(0.02), "embed", "vocab"),
            bias_init=with_axes(nn.initializers.zeros_init(), "vocab"),
            name="mlm_predictor",
        )
        return {"z": z, "p": p, "mlm_logits": mlm(outputs["mlm_tokens"])}


@dataclasses.dataclass(frozen=True)
class DeclipObjective(DeclipFields, Objective):
    """DeCLIP: multi-view CLIP + SimSiam + MLM + nearest-neighbour supervision from a text queue (A.3).

    Inputs: two MoCoV2 views (no standard crop), the MLM-masked caption (its
    embedding is the caption's in every contrastive term, as in the toolkit:
    one forward pass gives both), the EDA caption and the MLM targets.
    State: the FIFO queue of text embeddings ({"queue": [queue_size, D],
    "ptr"}), one queue for the whole job (the toolkit keeps one per GPU),
    rows sharded over the batch axes ("queue" in the sharding rules).
    """

    name: str = "declip"
    needs: tuple[str, ...] = (
        "view_embeds",
        "view_projected",
        "mlm_embeds",
        "mlm_tokens",
        "eda_embeds",
        "logit_scale",
        "objective",
    )
    # No standard crop: the two views only.
    inputs: tuple[str, ...] = ("tokens", "views", "tokens_eda", "tokens_mlm", "mlm_labels")
    views: int = 2
    pooled_only: bool = False

    def heads(self, dims: TowerDims) -> DeclipHeads:
        return DeclipHeads(self.proj_dim, self.pred_dim, dims.vocab_size, dims.dtype)

    def init_state(self, rng: jax.Array, dims: TowerDims) -> dict[str, jax.Array]:
        return queue_init(rng, self.queue_size, dims.embed_dim)

    def state_axes(self) -> dict[str, tuple[str | None, ...]]:
        return {"queue": ("queue", None), "ptr": ()}

    def next_state(self, outputs: Any, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return queue_push(queue_push(state, outputs["eda_embeds"]), outputs["mlm_embeds"])

    def terms(
        self, outputs: Any, batch: Any, *, mesh: Mesh | None, state: Any
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """The four DeCLIP terms (unweighted) and their metrics; DeFILIP adds FILIP's to these."""
        views, scale = outputs["view_embeds"], outputs["logit_scale"]
        texts = (outputs["mlm_embeds"], outputs["eda_embeds"])
        clip, metrics = clip_mvs_loss(views, texts, scale, mesh=mesh)
        heads = outputs["objective"]
        simsiam = simsiam_loss(*heads["p"], *heads["z"])
        mlm, mlm_accuracy = mlm_loss(heads["mlm_logits"], batch["mlm_labels"])
        neighbours = tuple(queue_nearest(state["queue"], t) for t in texts)  # before this batch is pushed
        nn_term = nn_loss(views, neighbours, scale, mesh=mesh)
        terms = {"clip_loss": clip, "simsiam_loss": simsiam, "mlm_loss": mlm, "nn_loss": nn_term}
        return terms, {**metrics, "mlm_accuracy": mlm_accuracy}

    def weights(self) -> dict[str, float]:
        return {
            "clip_loss": self.clip_weight,
            "simsiam_loss": self.simsiam_weight,
            "mlm_loss": self.mlm_weight,
            "nn_loss": self.nn_weight,
        }

    def __call__(
        self, outputs: Any, batch: Any, *, mesh: Mesh | None = None, state: Any = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        terms, metrics = self.terms(outputs, batch, mesh=mesh, state=state)
        loss = sum(w * terms[k] for k, w in self.weights().items())
        return loss, {**metrics, **terms, "loss": loss}
