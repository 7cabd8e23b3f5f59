"""Token-wise (late-interaction) scoring of zero-shot classification and retrieval, as FILIP is evaluated.

A FILIP run trains only its token space (objectives/filip.py: the pooled
embeddings have loss weight 0), so its pooled embeddings score at chance; the
DeCLIP toolkit (`filip_solver.py`, `evaluate`) scores FILIP's zero-shot
ImageNet token-wise, and so do we for every run whose `config.objective.name`
is "filip" (`scoring_for`; every other objective, DeFILIP included, is scored
with the pooled embeddings). The device side (the encoders, `late_interaction`
and its sharded, chunked form) is inference: veclip_jax/run/inference.py;
this module is what evaluation builds on it. The metric names do not change; the evaluation
report says which scoring was used (`scoring` in the JSON files and EvalRun).

Tokens (models/clip.py `encode_image_tokens`, `encode_text_tokens`): an
image's N patch tokens and a text's L position outputs, mapped by the
objective's heads into the D_tok-d token space and L2-normalised per token; a
text's valid tokens are the caption through its end-of-text token (padding is
excluded everywhere). With x^n the image tokens and y^m the valid tokens of a
text,

  late_interaction(x -> y) = mean_n max_m x^n . y^m                 (image -> text)
  late_interaction(y -> x) = mean_{m valid} max_n y^m . x^n         (text -> image)

the training loss's definitions (filip.py) without its top-k token selection
(the toolkit's evaluation keeps every token).

- Zero-shot: each class's token set is built as the toolkit builds it, with
  padding masked: every template's prompt is encoded to tokens (normalised
  per token), the prompts are averaged position by position, a position over
  the prompts where it is valid (a position no prompt reaches is invalid; the
  toolkit averages the padding in), and each averaged token is normalised
  again: [L, D_tok] per class. An image's logit for a class is the image ->
  text late interaction with the class's token set.
- Retrieval: image -> text (the papers' I2T) ranks texts by image -> text late
  interaction, text -> image (T2I) ranks images by text -> image late
  interaction; recall@k as for pooled embeddings (retrieval.py).
- Linear probe: always the pooled, L2-normalised image embeddings, for FILIP
  too (a probe fits one feature vector per image). A FILIP run does not train
  its pooled projection (loss weight 0), so its probe measures the towers
  through an untrained head.

Memory (bounded by construction; figures for ViT-B/32 at 224 px, N = 49,
D_tok = 256, float32; B/16 has N = 196, four times the image figures):

- The scores are formed a block at a time on the devices: a block of queries
  against a chunk of keys, [queries, keys, N_q, N_k] cosines, at most
  SCORE_BLOCK = 2^25 floats (128 MiB) per device; the chunk size follows from
  the shapes.
- Zero-shot ImageNet (50,000 images, 1,000 classes x 80 templates): the host
  accumulates the class token sets, [1000, L_c, 256] (L_c the longest prompt,
  at most 77: <= 79 MB, also replicated on each device); the prompts' tokens
  are never held together (80,000 x 77 x 256 floats would be 6.3 GB). The
  image tokens never leave the devices: each encoded batch is scored there
  against all classes and only its [batch, 1000] logits come back, of which the
  host keeps the top 5; the [50,000, 49, 256] image tokens (2.5 GB; 10 GB for
  B/16) are never formed anywhere. Per device, with 128 images each
  (eval_batch_size 4,096 on 32 devices) and L_c = 77: chunks of 69 classes,
  [128, 69, 49, 77] = 33M floats.
- Retrieval (COCO 5k: 5,000 images, 25,010 captions): the host holds every
  image's tokens, [5000, 49, 256] (251 MB; 1.0 GB for B/16), and every
  caption's, [25010, L_t, 256] (L_t the longest caption: 0.5 GB at 20, 1.97 GB
  at 77). The side being ranked is put on the devices once, sharded over the
  batch axes (1/shards of it per device), and the queries go over it in blocks
  of TokenScorer.block (256) rows; the host holds one block of query rows
  against all keys at a time (1,024 x 25,010 floats, 100 MB). Flickr30k (1,000
  images, 5,000 captions) is a fifth of that.
- ImageNet-size retrieval (50,000 images, 250,000 captions) would hold 2.5 GB
  of image tokens and 5.1 to 19.7 GB of caption tokens (L_t 20 to 77) on the
  host, 1/shards of the ranked side per device, and the scores stay at
  SCORE_BLOCK per device and [1024, 250,000] (1 GB) on the host at a time.
- Compute is what it must be: ImageNet zero-shot for B/32 is 50,000 x 1,000 x
  49 x L_c x 256 multiply-adds (1.3e13 at L_c = 20), seconds on an accelerator,
  hours on a CPU.

Scores are computed in float32 at full matmul precision.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from veclip_jax.parallel.mesh import batch_sharding, replicated
from veclip_jax.run.inference import (
    POOLED,
    SCORE_BLOCK,
    TOKENWISE,
    Keys,
    batch_shards,
    key_chunk,
    pad_rows,
    put,
    sharded_late_interaction,
)

# What the report says for each scoring.
DESCRIPTION = {
    POOLED: "pooled embeddings (cosine similarity)",
    TOKENWISE: "token-wise late interaction in the objective's token space (FILIP's evaluation)",
}


def class_token_sets(
    batches: Iterable[tuple[int, np.ndarray, np.ndarray]], num_classes: int, num_templates: int
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [C, L, D] class token sets, bool [C, L] validity) from the prompts' tokens.

    `batches` yields (index of the first prompt, tokens [b, L, D] unit norm per
    token, validity [b, L]) over the prompts in class-major order (class c's
    templates are prompts c*T ... c*T + T - 1). Per class and position: the
    mean over the prompts valid there, normalised again; a position valid in no
    prompt is invalid (a zero vector).
    """
    sums: np.ndarray | None = None
    counts = None
    for start, tok, valid in batches:
        if sums is None:
            sums = np.zeros((num_classes, *tok.shape[1:]), np.float64)
            counts = np.zeros((num_classes, tok.shape[1]), np.int64)
        cls = (start + np.arange(len(tok))) // num_templates  # non-decreasing
        first = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
        masked = np.where(valid[..., None], tok, 0.0).astype(np.float64)
        sums[cls[first]] += np.add.reduceat(masked, first, axis=0)
        counts[cls[first]] += np.add.reduceat(valid.astype(np.int64), first, axis=0)
    if sums is None:
        raise ValueError("zero-shot needs at least one class name and one template")
    mean = sums / np.maximum(counts, 1)[..., None]
    norm = np.linalg.norm(mean, axis=-1, keepdims=True)
    valid = counts > 0
    out = np.where(valid[..., None], mean / np.maximum(norm, 1e-12), 0.0)
    return out.astype(np.float32), valid


class TokenScorer:
    """Late-interaction scores of host query tokens against a token set held on the mesh (sharded).

    `keys(tokens, valid, query_tokens)` puts a set on the devices once, split
    over the batch axes; `scores(q, q_valid, keys)` gives [len(q), keys.count]
    on the host, the queries sent `block` rows at a time (replicated), each
    device scoring them against its share of the keys a chunk at a time
    (SCORE_BLOCK). Every process calls it alike, with the same arrays.
    """

    def __init__(self, mesh: Mesh, block: int = 256, budget: int = SCORE_BLOCK):
        self.mesh, self.block, self.budget = mesh, block, budget
        self.shards = batch_shards(mesh)
        self._fns: dict[int, Any] = {}

    def keys(self, tokens: np.ndarray, valid: np.ndarray, query_tokens: int) -> Keys:
        n, per_key = len(tokens), tokens.shape[1]
        local = max(1, math.ceil(n / self.shards))
        chunk = key_chunk(self.block, query_tokens, per_key, local, self.budget)
        rows = self.shards * chunk * math.ceil(local / chunk)
        tok, val = pad_rows(np.asarray(tokens, np.float32), rows), pad_rows(np.asarray(valid, bool), rows)
        return Keys(put(tok, batch_sharding(self.mesh, 3)), put(val, batch_sharding(self.mesh, 2)), n, chunk)

    def _fn(self, chunk: int) -> Any:
        if chunk not in self._fns:
            rep = replicated(self.mesh)
            fn = functools.partial(sharded_late_interaction, self.mesh, shard="keys", chunk=chunk)
            self._fns[chunk] = jax.jit(
                fn,
                in_shardings=(rep, rep, batch_sharding(self.mesh, 3), batch_sharding(self.mesh, 2)),
                out_shardings=rep,
            )
        return self._fns[chunk]

    def scores(self, q: np.ndarray, q_valid: np.ndarray, keys: Keys) -> np.ndarray:
        """float32 [len(q), keys.count]: late_interaction(q -> keys)."""
        fn, rep, b = self._fn(keys.chunk), replicated(self.mesh), self.block
        out = np.empty((len(q), keys.count), np.float32)
        with jax.set_mesh(self.mesh):
            for s in range(0, len(q), b):
                qb = pad_rows(np.asarray(q[s : s + b], np.float32), b)
                vb = pad_rows(np.asarray(q_valid[s : s + b], bool), b)
                res = fn(put(qb, rep), put(vb, rep), keys.tokens, keys.valid)
                out[s : s + b] = np.asarray(res)[: len(out) - s, : keys.count]
        return out
