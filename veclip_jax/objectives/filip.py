"""FILIP's token-wise late-interaction contrastive loss (Yao et al., 2021), as DeCLIP's benchmark runs it.

With x_a^n the L2-normalised image tokens of item a (n < N patches), y_a^l its
text tokens (l < L positions, V_a the valid ones: the caption through its
end-of-text token) and s the dense logit scale (exponentiated, not clamped):

  i2t[a, b] = mean_{n}       max_{m in T_b} x_a^n . y_b^m
  t2i[a, b] = mean_{l in V_a} max_{m in I_b} y_a^l . x_b^m
  loss      = ( CE(s * i2t, diag) + CE(s * t2i, diag) ) / 2, averaged over the global batch B

The local side a uses all its tokens; the remote side b only the tokens it
selected from its own pair (DeCLIP's `select_topk`, applied before the
gather to cut communication): with S_b = x_b y_b^T [N, L], I_b holds the
top_k patches by row sum of S_b over the valid text columns and T_b the
top_k valid text positions by column sum of S_b. A caption with fewer than
top_k valid tokens leaves its extra slots of T_b marked invalid. The choice
is an index (no gradient); the gradient flows through the chosen features.

Unlike the toolkit, padding is masked (DeCLIP issue #31; the FILIP paper
discards padded tokens): it is never selected, enters no max (-inf) and no
mean (masked mean), and padded features are zeroed on entry, so they change
neither the value nor the gradient (theirs is exactly 0).

On a mesh each device selects its own pairs' tokens and passes the selected
blocks (image, text and text validity) round the ring with `ppermute`, as
siglip.py does with texts, writing one [b, B/n] block of its rows of i2t and
t2i per hop; the per-hop scores are rematerialised in the backward pass, so
no device ever holds [b, B, N, k]. After n hops every row is complete: the
cross-entropy is taken per local row and the sums are `psum`-ed, so the
value and its gradient equal the dense formula's on any mesh.

Memory, ViT-B/32 at 224 px (N = 49 patches, L = 77, k = 16, 256-d tokens,
float32), b = 128 per device, B = 4096 (n = 32, B/n = 128): the per-hop
score blocks are [128, 128, 49, 16] for i2t (12.8M floats, 49 MiB) and
[128, 128, 77, 16] for t2i (20.2M floats, 77 MiB), 126 MiB together; the
backward pass recomputes one hop's blocks and holds their cotangents, about
twice that. Filling the rows at once ([b, B, ., k]) would take 32x as much
(3.9 GiB), and the dense path on one device ([B, B, ., k]) 126 GiB. What
the ring keeps for the backward pass is the selected tokens of every hop,
[B, 16, 256] per modality (64 MiB each, what the toolkit's all-gather
holds), and the [b, B] logit rows (2 MiB each). XLA's CPU compile of this
value-and-gradient on 32 devices reports 704 MiB of temporaries per device
(5.2 GiB without the remat, 10.5 GiB with an all-gather instead of the ring).

`filip_logits` gives the [B, B] logits themselves (row-sharded on a mesh).

Through the seam (objectives/base.py): `FilipObjective` (FilipHeads map the
towers' patch tokens and every text position to the token space and own the
dense temperature) and `DefilipObjective` (DeCLIP's objective with FILIP's
term between view 1 and the masked caption added).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from veclip_jax.models.layers import l2_normalize
from veclip_jax.objective_fields import DefilipFields, FilipFields
from veclip_jax.objectives.base import Objective, TowerDims
from veclip_jax.objectives.clip import clip_loss, cross_entropy_sum
from veclip_jax.objectives.declip import DeclipHeads, DeclipObjective
from veclip_jax.objectives.heads import ScalarParams, dense
from veclip_jax.parallel.axes import BATCH_AXES

Selected = tuple[jax.Array, jax.Array, jax.Array]


def _normalise(tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """float32 tokens over unit L2 norm per token; positions not `valid` become zero vectors."""
    x = tokens.astype(jnp.float32)
    if valid is not None:
        x = jnp.where(valid[..., None], x, 0.0)  # a zero token stays zero, with a zero gradient
    return l2_normalize(x)


def select_topk_tokens(
    image_tokens: jax.Array, text_tokens: jax.Array, text_valid: jax.Array, top_k: int
) -> Selected:
    """Each pair's own top_k image and text tokens, by its image-text token similarities.

    Args:
      image_tokens: [B, N, D] L2-normalised; text_tokens: [B, L, D]
        L2-normalised; text_valid: [B, L] bool.
      top_k: how many of each to keep; top_k >= N (or >= L) keeps that side whole.
    Returns:
      (image [B, min(k, N), D], text [B, min(k, L), D], text validity
      [B, min(k, L)] bool): image patches by row sum of x y^T over the valid
      text columns, valid text positions by column sum; slots past a short
      caption's valid tokens are invalid.
    """
    n, length = image_tokens.shape[1], text_tokens.shape[1]
    if top_k >= n and top_k >= length:
        return image_tokens, text_tokens, text_valid
    sims = jnp.einsum("bnd,bld->bnl", jax.lax.stop_gradient(image_tokens), jax.lax.stop_gradient(text_tokens))
    sims = jnp.where(text_valid[:, None, :], sims, 0.0)
    img, txt, valid = image_tokens, text_tokens, text_valid
    if top_k < n:
        _, idx = jax.lax.top_k(jnp.sum(sims, axis=2), top_k)  # [B, k]
        img = jnp.take_along_axis(image_tokens, idx[..., None], axis=1)
    if top_k < length:
        _, idx = jax.lax.top_k(jnp.where(text_valid, jnp.sum(sims, axis=1), -jnp.inf), top_k)
        txt = jnp.take_along_axis(text_tokens, idx[..., None], axis=1)
        valid = jnp.take_along_axis(text_valid, idx, axis=1)
    return img, txt, valid


def late_interaction_logits(
    image_tokens: jax.Array,
    text_tokens: jax.Array,
    text_valid: jax.Array,
    sel_image: jax.Array,
    sel_text: jax.Array,
    sel_text_valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """i2t, t2i [a, c]: rows a of local items (all their tokens), columns c of selected-token blocks.

    Args:
      image_tokens [a, N, D], text_tokens [a, L, D], text_valid [a, L]: the rows.
      sel_image [c, ki, D], sel_text [c, kt, D], sel_text_valid [c, kt]: the columns.
    Returns:
      i2t: mean over the row's patches of the max over the column's valid
      selected text tokens; t2i: mean over the row's valid text tokens of the
      max over the column's selected patches (cosines, unscaled).
    """
    s = jnp.einsum("and,cmd->acnm", image_tokens, sel_text)  # [a, c, N, kt]
    s = jnp.where(sel_text_valid[None, :, None, :], s, -jnp.inf)
    i2t = jnp.mean(jnp.max(s, axis=-1), axis=-1)
    s = jnp.einsum("ald,cmd->aclm", text_tokens, sel_image)  # [a, c, L, ki]
    best = jnp.where(text_valid[:, None, :], jnp.max(s, axis=-1), 0.0)
    count = jnp.maximum(jnp.sum(text_valid, axis=-1), 1).astype(jnp.float32)
    t2i = jnp.sum(best, axis=-1) / count[:, None]
    return i2t, t2i


def _row_sums(
    i2t: jax.Array, t2i: jax.Array, labels: jax.Array, scale: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Over complete rows [b, B] whose positives sit at `labels`: (sum of both CEs, i2t hits, t2i hits)."""
    positive = labels[:, None] == jnp.arange(i2t.shape[1])[None, :]
    loss = sum(cross_entropy_sum(logits, positive, scale) for logits in (i2t, t2i))  # stable form: clip.py
    hits = [jnp.sum(jnp.argmax(logits, axis=-1) == labels) for logits in (i2t, t2i)]
    return loss, hits[0], hits[1]


def _finish(
    loss_sum: jax.Array, i2t_hits: jax.Array, t2i_hits: jax.Array, batch: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss = loss_sum / float(2 * batch)  # floats: no int32 count reaches JAX (clip.py)
    metrics = {
        "filip_loss": loss,
        "filip_i2t_accuracy": i2t_hits / float(batch),
        "filip_t2i_accuracy": t2i_hits / float(batch),
    }
    return loss, metrics


def _ring_rows(
    img: jax.Array, txt: jax.Array, valid: jax.Array, top_k: int, n: int, batch_axes: tuple[str, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inside shard_map: this device's rows [b, B] of i2t and t2i, filled hop by hop, and their labels."""
    b = img.shape[0]
    img, txt = _normalise(img), _normalise(txt, valid)
    sel = select_topk_tokens(img, txt, valid, top_k)
    me = jax.lax.axis_index(batch_axes)
    ring = [(i, (i + 1) % n) for i in range(n)]
    # Recompute each hop's [b, B/n, ., k] scores in the backward pass instead of stacking them over hops.
    block = jax.checkpoint(late_interaction_logits)

    def fill(rows: tuple, sel: Selected, owner: jax.Array) -> tuple:
        """Write the block of device `owner`'s items into the columns it owns."""
        blocks = block(img, txt, valid, *sel)
        return tuple(
            jax.lax.dynamic_update_slice(r, x, (0, owner * b)) for r, x in zip(rows, blocks, strict=True)
        )

    rows = (jnp.zeros((b, n * b), jnp.float32), jnp.zeros((b, n * b), jnp.float32))
    rows = fill(rows, sel, me)  # hop 0: the device's own items, positives included

    def hop(carry: tuple, h: jax.Array) -> tuple[tuple, None]:
        sel, rows = carry
        sel = jax.lax.ppermute(sel, batch_axes, ring)  # now the items of device me - h
        return (sel, fill(rows, sel, (me - h) % n)), None

    if n > 1:
        (_, rows), _ = jax.lax.scan(hop, (sel, rows), jnp.arange(1, n))
    return rows[0], rows[1], me * b + jnp.arange(b)


def _dense_logits(
    image_tokens: jax.Array, text_tokens: jax.Array, valid: jax.Array, top_k: int
) -> tuple[jax.Array, jax.Array]:
    """The direct formula: every item's selection, then [B, B] logits at once ([B, B, ., k] scores)."""
    img, txt = _normalise(image_tokens), _normalise(text_tokens, valid)
    return late_interaction_logits(img, txt, valid, *select_topk_tokens(img, txt, valid, top_k))


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: keep at least one token")


def filip_logits(
    image_tokens: jax.Array,
    text_tokens: jax.Array,
    text_valid: jax.Array,
    *,
    top_k: int = 16,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> tuple[jax.Array, jax.Array]:
    """The unscaled late-interaction logits i2t, t2i [B, B] of the whole batch (arguments as filip_loss).

    With a mesh they come back sharded by rows over `batch_axes`, each
    device's rows filled by the ring, exactly as the loss sees them.
    """
    _check_top_k(top_k)
    valid = jnp.asarray(text_valid, bool)
    if mesh is None:
        return _dense_logits(image_tokens, text_tokens, valid, top_k)
    n = math.prod(mesh.shape[a] for a in batch_axes)
    rows = functools.partial(_ring_rows, top_k=top_k, n=n, batch_axes=batch_axes)

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(batch_axes), P(batch_axes), P(batch_axes)),
        out_specs=(P(batch_axes), P(batch_axes)),
    )
    def ringwise(img: jax.Array, txt: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rows(img, txt, valid)[:2]

    return ringwise(image_tokens, text_tokens, valid)


def filip_loss(
    image_tokens: jax.Array,
    text_tokens: jax.Array,
    text_valid: jax.Array,
    scale: jax.Array | float,
    *,
    top_k: int = 16,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FILIP's symmetric InfoNCE over late-interaction logits of the whole (global) batch.

    Args:
      image_tokens: [B, N, D] patch tokens in the shared token space, not
        normalised (done here, per token, in float32).
      text_tokens: [B, L, D] text tokens, likewise.
      text_valid: [B, L] bool, True for the caption's tokens through its
        end-of-text token, False for padding. Every caption needs one.
      scale: the dense logit scale s (already exponentiated).
      top_k: tokens each pair keeps for the other items (module doc);
        >= N, L keeps all.
      mesh: when given, the arrays are taken as sharded over `batch_axes`
        and the selected tokens travel round the ring (module doc).
    Returns:
      (loss, metrics): filip_loss, filip_i2t_accuracy, filip_t2i_accuracy
      (the row's argmax is its pair).
    """
    _check_top_k(top_k)
    valid = jnp.asarray(text_valid, bool)
    s = jnp.asarray(scale, jnp.float32)
    batch = image_tokens.shape[0]
    if mesh is None:
        i2t, t2i = _dense_logits(image_tokens, text_tokens, valid, top_k)
        return _finish(*_row_sums(i2t, t2i, jnp.arange(batch), s), batch)
    n = math.prod(mesh.shape[a] for a in batch_axes)
    rows = functools.partial(_ring_rows, top_k=top_k, n=n, batch_axes=batch_axes)

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(batch_axes), P(batch_axes), P(batch_axes), P()),
        out_specs=P(),
    )
    def ringwise(img: jax.Array, txt: jax.Array, valid: jax.Array, s: jax.Array) -> tuple[jax.Array, ...]:
        sums = _row_sums(*rows(img, txt, valid), s)  # the cross-entropies of this device's complete rows
        return tuple(jax.lax.psum(x, batch_axes) for x in sums)

    return _finish(*ringwise(image_tokens, text_tokens, valid, s), batch)


class FilipHeads(nn.Module):
    """FILIP's token mappings into the shared token space (Linear image width -> 256, text width -> 256)
    and its own temperature, `dense_logit_scale` (not clipped, as in the toolkit)."""

    token_dim: int
    scale_init: float
    text_input: str = "text"  # "text": the caption; "mlm": the masked caption (DeFILIP)

    @nn.compact
    def __call__(self, outputs: Any) -> dict[str, Any]:
        image = dense(self.token_dim, "embed", "proj", name="image_mapping")(outputs["view_tokens"][0])
        text = dense(self.token_dim, "embed", "proj", name="text_mapping")(
            outputs[f"{self.text_input}_tokens"]
        )
        (scale,) = ScalarParams((("dense_logit_scale", self.scale_init),), name="scales")().values()
        return {"image_tokens": image, "text_tokens": text, "dense_scale": jnp.exp(scale)}


@dataclasses.dataclass(frozen=True)
class FilipObjective(FilipFields, Objective):
    """FILIP: InfoNCE over token-wise late-interaction similarities (OBJECTIVES.md A.5).

    The toolkit's recipe: view 1 of the MoCoV2 transform, the dense loss only
    (`clip_weight` 0: the pooled embeddings are not trained; their CLIP loss
    is still logged), top-16 token selection, 256-d token space, padding
    masked out (the toolkit does not mask it).
    """

    name: str = "filip"
    needs: tuple[str, ...] = (
        "view_tokens",
        "view_embeds",
        "text_tokens",
        "text_embeds",
        "text_valid",
        "logit_scale",
        "objective",
    )
    inputs: tuple[str, ...] = ("tokens", "views")  # view 1, no standard crop
    gauges: tuple[str, ...] = ("logit_scale", "filip_logit_scale")
    views: int = 1
    pooled_only: bool = False

    def heads(self, dims: TowerDims) -> FilipHeads:
        return FilipHeads(self.token_dim, self.dense_scale_init)

    def __call__(
        self, outputs: Any, batch: Any, *, mesh: Mesh | None = None, state: Any = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        heads = outputs["objective"]
        dense_loss, dense_metrics = filip_loss(
            heads["image_tokens"], heads["text_tokens"], outputs["text_valid"], heads["dense_scale"],
            top_k=self.top_k, mesh=mesh,
        )  # fmt: skip
        clip, metrics = clip_loss(
            outputs["view_embeds"][0], outputs["text_embeds"], outputs["logit_scale"], mesh=mesh
        )
        loss = self.dense_weight * dense_loss + self.clip_weight * clip
        extra = {"clip_loss": clip, "filip_logit_scale": heads["dense_scale"]}
        return loss, {**metrics, **dense_metrics, **extra, "loss": loss}


class DefilipHeads(nn.Module):
    """DeCLIP's heads and FILIP's token mappings (on view 1 and the masked caption)."""

    declip: DeclipHeads
    filip: FilipHeads

    @nn.compact
    def __call__(self, outputs: Any) -> dict[str, Any]:
        return {**self.declip(outputs), **self.filip(outputs)}


@dataclasses.dataclass(frozen=True)
class DefilipObjective(DefilipFields, DeclipObjective):
    """DeFILIP: every DeCLIP term plus FILIP's token-wise term between view 1 and the masked caption (A.6).

    Weights (the toolkit's): clip 0.4, simsiam 0.2, mlm 0.2, nn 0.2, filip 0.2
    (they sum to 1.2).
    """

    name: str = "defilip"
    needs: tuple[str, ...] = (*DeclipObjective.needs, "view_tokens", "text_valid")
    gauges: tuple[str, ...] = ("logit_scale", "filip_logit_scale")

    def heads(self, dims: TowerDims) -> DefilipHeads:
        # Unnamed: DefilipHeads adopts it as objective/filip (given a name here, flax would bind it to the
        # module being set up, the model, putting its parameters at the top of the tree beside the towers).
        filip = FilipHeads(self.token_dim, self.dense_scale_init, text_input="mlm")
        return DefilipHeads(DeclipObjective.heads(self, dims), filip)

    def weights(self) -> dict[str, float]:
        return {**super().weights(), "filip_loss": self.filip_weight}

    def terms(self, outputs: Any, batch: Any, *, mesh: Mesh | None, state: Any) -> tuple[dict, dict]:
        terms, metrics = super().terms(outputs, batch, mesh=mesh, state=state)
        heads = outputs["objective"]
        filip, filip_metrics = filip_loss(
            heads["image_tokens"], heads["text_tokens"], outputs["text_valid"], heads["dense_scale"],
            top_k=self.top_k, mesh=mesh,
        )  # fmt: skip
        return {**terms, "filip_loss": filip}, {
            **metrics,
            **filip_metrics,
            "filip_logit_scale": heads["dense_scale"],
        }
