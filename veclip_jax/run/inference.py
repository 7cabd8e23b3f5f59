"""Inference on a mesh: jitted image and text encoders, numpy in, L2-normalised numpy out.

The run layer's model side: `veclip_jax.load` (one device), evaluation
during training (parameters as the train state holds them, sharded) and
standalone evaluation (veclip_jax/eval/) all encode through `Encoders`.
Inputs are cut into batches of a fixed size (the last one padded), so each
encoder compiles once (per image dtype). Images are pixels, not normalised:
uint8 (the evaluation transforms' output, a quarter of float32's bytes to the
devices) or float in [0, 255] (VeCLIP's unrounded TF-style bilinear resize);
the model normalises them with its image mean/std inside the jitted encoder
(models/clip.py `normalize_pixels`). Every process passes the same full inputs and gets the
full outputs (multi-host safe: each device takes its rows of the global batch
from the host copy).

`image_batch` is the streaming form (veclip_jax/eval/embed.py): each process
passes only its own rows, with an int32 tag per row (its example index and
label), and every process gets the whole global batch's embeddings and tags,
so no process has to read or decode another's images.

Token-wise mode (`scoring` TOKENWISE, the default for a FILIP model;
`scoring_for`): `text_token_batches` / `text_tokens` give the texts' tokens
in the objective's token space with their validity, `image_token_batch` the
images' patch tokens, and `zeroshot_batch` encodes a batch of images and
scores it against class token sets on the devices (the image tokens never
come back to the host). The pooled encoders stay available in either mode
(linear probes, `veclip_jax.load`). The late-interaction score and its
sharded, chunked form are here because the devices compute them; how
evaluation uses them (class token sets, retrieval, the memory bounds) is
veclip_jax/eval/tokenwise.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from veclip_jax.objectives.model import ObjectiveModel, as_variables
from veclip_jax.parallel.axes import BATCH_AXES
from veclip_jax.parallel.mesh import batch_sharding, replicated
from veclip_jax.parallel.rules import DEFAULT_RULES, LogicalRules

POOLED, TOKENWISE = "pooled", "tokenwise"
# Objectives (config.objective.name) evaluated token-wise. DeFILIP trains its pooled embeddings
# (DeCLIP's terms) and is evaluated pooled, as the toolkit does.
TOKENWISE_OBJECTIVES = frozenset({"filip"})

# The most score entries ([queries, keys, N_q, N_k] float32) one device forms at once: 128 MiB.
SCORE_BLOCK = 1 << 25


def scoring_for(objective: Any) -> str:
    """POOLED or TOKENWISE for an objective (an Objective, or its config.objective.name)."""
    name = objective if isinstance(objective, str) else getattr(objective, "name", "clip")
    return TOKENWISE if name in TOKENWISE_OBJECTIVES else POOLED


def text_validity(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """bool [n, L]: each row's positions through its first end-of-text token (models/clip.py's rule)."""
    tokens = np.asarray(tokens)
    eot = np.argmax(tokens == eos_id, axis=-1)
    return np.arange(tokens.shape[1])[None, :] <= eot[:, None]


def late_interaction(q: jax.Array, q_valid: jax.Array, k: jax.Array, k_valid: jax.Array) -> jax.Array:
    """[a, c]: for query a and key c, the mean over a's valid tokens of the max over c's valid tokens
    of the token cosines (q [a, Nq, D], k [c, Nk, D], unit norm per token; validity [a, Nq], [c, Nk]).

    A key without a valid token scores -inf (padding rows); a query without one scores 0.
    """
    s = jnp.einsum("and,cmd->acnm", q, k, precision=jax.lax.Precision.HIGHEST)
    best = jnp.max(jnp.where(k_valid[None, :, None, :], s, -jnp.inf), axis=-1)  # [a, c, Nq]
    total = jnp.sum(jnp.where(q_valid[:, None, :], best, 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(q_valid, axis=-1), 1).astype(jnp.float32)[:, None]


def key_chunk(queries: int, query_tokens: int, key_tokens: int, keys: int, budget: int = SCORE_BLOCK) -> int:
    """Keys per chunk so that [queries, chunk, query_tokens, key_tokens] stays within `budget` floats."""
    return max(1, min(max(keys, 1), budget // max(1, queries * query_tokens * key_tokens)))


def _chunked(q: jax.Array, qv: jax.Array, k: jax.Array, kv: jax.Array, *, chunk: int) -> jax.Array:
    """late_interaction over the keys `chunk` at a time (k's rows a multiple of chunk): [a, c]."""
    n = k.shape[0] // chunk
    blocks = (k.reshape(n, chunk, *k.shape[1:]), kv.reshape(n, chunk, kv.shape[1]))
    out = jax.lax.map(lambda b: late_interaction(q, qv, *b), blocks)  # [n, a, chunk]
    return jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n * chunk)


def sharded_late_interaction(
    mesh: Mesh, q: jax.Array, qv: jax.Array, k: jax.Array, kv: jax.Array, *, shard: str, chunk: int
) -> jax.Array:
    """late_interaction [a, c] on a mesh (inside jit): `shard` "queries" splits the queries over the
    batch axes (the keys replicated), "keys" the keys (each device's share a multiple of `chunk`)."""
    whole, split = P(), P(BATCH_AXES)
    if shard == "queries":
        specs, out = (split, split, whole, whole), P(BATCH_AXES, None)
    elif shard == "keys":
        specs, out = (whole, whole, split, split), P(None, BATCH_AXES)
    else:
        raise ValueError(f"shard={shard!r}: 'queries' or 'keys'")
    fn = functools.partial(_chunked, chunk=chunk)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out)(q, qv, k, kv)


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """x with zero rows appended up to n rows."""
    if len(x) >= n:
        return x
    return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])


def pixels(images: np.ndarray) -> np.ndarray:
    """Images as the encoders take them: uint8 as they are, any other dtype as float32 (0-255 pixel
    values; the model normalises either in its jitted computation)."""
    images = np.asarray(images)
    return images if images.dtype == np.uint8 else images.astype(np.float32)


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array: each device takes its slice."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


@dataclasses.dataclass
class Keys:
    """A token set on the devices: tokens [rows, N, D], validity [rows, N] (rows padded), `count` real."""

    tokens: jax.Array
    valid: jax.Array
    count: int
    chunk: int  # keys per score chunk (per device)


class Encoders:
    """`images(params, uint8 [n,S,S,3])` and `texts(params, int32 [n,L])` -> float32 [n, embed_dim].

    Images are RGB pixels, uint8 or float in [0, 255], never normalised by the caller: the model
    applies its image mean/std inside the jitted encoders.

    `params` here are the model's variables, `objectives.model.variables(params, model_state)`:
    {"params": ...} and, for a ResNet, its BatchNorm running averages (`param_shardings` alike);
    a bare parameter tree serves a model without state (`as_variables`).
    """

    def __init__(
        self,
        model: ObjectiveModel,
        mesh: Mesh,
        param_shardings: Any,
        batch_size: int,
        rules: LogicalRules = DEFAULT_RULES,
        scoring: str | None = None,
    ):
        shards = batch_shards(mesh)
        if batch_size % shards:
            raise ValueError(f"encoder batch size {batch_size} does not divide over {shards} batch shards")
        self.model, self.mesh, self.rules, self.batch_size = model, mesh, rules, batch_size
        # How tasks score zero-shot classification and retrieval: from the model's objective by default.
        self.scoring = scoring or scoring_for(model.spec)
        if self.scoring not in (POOLED, TOKENWISE):
            raise ValueError(f"scoring={self.scoring!r}: use {POOLED!r} or {TOKENWISE!r}")
        self.param_shardings = param_shardings

        def encode_image(params: Any, images: jax.Array) -> jax.Array:
            return model.apply(as_variables(params), images, method=ObjectiveModel.encode_image)

        def encode_text(params: Any, tokens: jax.Array) -> jax.Array:
            return model.apply(as_variables(params), tokens, method=ObjectiveModel.encode_text)

        def encode_tagged(params: Any, images: jax.Array, tags: jax.Array) -> tuple[jax.Array, jax.Array]:
            return encode_image(params, images), tags

        rep = replicated(mesh)
        self._tagged = jax.jit(
            encode_tagged,
            in_shardings=(param_shardings, batch_sharding(mesh, 4), batch_sharding(mesh, 2)),
            out_shardings=(rep, rep),
        )
        self._image = jax.jit(
            encode_image, in_shardings=(param_shardings, batch_sharding(mesh, 4)), out_shardings=rep
        )
        self._text = jax.jit(
            encode_text, in_shardings=(param_shardings, batch_sharding(mesh, 2)), out_shardings=rep
        )

        # Token-wise (compiled on first use only).
        def image_tokens_tagged(
            params: Any, images: jax.Array, tags: jax.Array
        ) -> tuple[jax.Array, jax.Array]:
            return model.apply(as_variables(params), images, method=ObjectiveModel.encode_image_tokens), tags

        def text_tokens(params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
            return model.apply(as_variables(params), tokens, method=ObjectiveModel.encode_text_tokens)

        self._image_tokens = jax.jit(
            image_tokens_tagged,
            in_shardings=(param_shardings, batch_sharding(mesh, 4), batch_sharding(mesh, 2)),
            out_shardings=(rep, rep),
        )
        self._text_tokens = jax.jit(
            text_tokens, in_shardings=(param_shardings, batch_sharding(mesh, 2)), out_shardings=(rep, rep)
        )
        self._zeroshot: dict[int, Any] = {}  # class chunk -> jitted encode-and-score

    def _run(
        self, fn: Any, params: Any, x: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        n, b = len(x), self.batch_size
        outs = []
        sharding = batch_sharding(self.mesh, x.ndim)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for start in range(0, n, b):
                chunk = x[start : start + b]
                if len(chunk) < b:
                    chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)])
                arr = jax.make_array_from_callback(chunk.shape, sharding, lambda idx, c=chunk: c[idx])
                outs.append(np.asarray(fn(params, arr))[: min(b, n - start)])
                if progress is not None:
                    progress(len(outs[-1]))
        if not outs:
            return np.zeros((0, self.model.towers.embed_dim), np.float32)
        return np.concatenate(outs)

    def images(self, params: Any, images: np.ndarray) -> np.ndarray:
        """uint8 [n, S, S, 3] RGB (S = the model's image size; or float pixels in [0, 255]) ->
        [n, embed_dim]. Not normalised: the model does it, on the devices."""
        return self._run(self._image, params, pixels(images))

    def texts(
        self, params: Any, tokens: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """int32 [n, context_length] token rows (end-of-text included) -> [n, embed_dim].

        `progress(k)` is called after each batch with the number of rows it encoded.
        """
        return self._run(self._text, params, np.asarray(tokens, np.int32), progress)

    @property
    def local_batch_size(self) -> int:
        """The rows each process passes to `image_batch`."""
        if self.batch_size % jax.process_count():
            raise ValueError(f"batch size {self.batch_size} does not divide over {jax.process_count()} hosts")
        return self.batch_size // jax.process_count()

    def _global_batch(
        self, fn: Any, params: Any, images: np.ndarray, tags: np.ndarray, *extra: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        mesh, n = self.mesh, self.batch_size
        with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules):
            glob = [
                jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, (n, *x.shape[1:]))
                for x in (pixels(images), np.asarray(tags, np.int32))
            ]
            out, out_tags = fn(params, *glob, *extra)
        return np.asarray(out), np.asarray(out_tags)

    def image_batch(self, params: Any, images: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows -> (embeddings [batch_size, D], tags [batch_size, k]) of the global batch.

        images: uint8 (or float 0-255) [local_batch_size, S, S, 3], resized and cropped, not
        normalised (the same dtype on every process); tags: int32
        [local_batch_size, k] (padding rows are the caller's to mark). Every
        process calls it the same number of times (a collective).
        """
        return self._global_batch(self._tagged, params, images, tags)

    # --- token-wise ------------------------------------------------------------------------------

    @property
    def token_shape(self) -> tuple[int, int]:
        """(patch tokens per image N, token dimension D_tok) of the token-wise encoders."""
        dim = getattr(self.model.spec, "token_dim", None)
        if dim is None:
            raise ValueError(f"objective {self.model.spec.name!r} has no token space")
        return (self.model.towers.image_size // self.model.towers.patch_size) ** 2, int(dim)

    def image_token_batch(
        self, params: Any, images: np.ndarray, tags: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `image_batch`, with the mapped patch tokens [batch_size, N, D_tok] (unit norm per token)."""
        return self._global_batch(self._image_tokens, params, images, tags)

    def text_token_batches(
        self, params: Any, tokens: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row, float32 [b, L', D_tok] tokens, bool [b, L'] validity) per batch of `tokens` rows.

        L' is the longest valid row of all of `tokens` (the positions after it
        are padding in every row); padding positions are zero vectors.
        """
        tokens = np.asarray(tokens, np.int32)
        length = int(text_validity(tokens, self.model.towers.eos_id).sum(axis=1).max(initial=1))
        n, b, sharding = len(tokens), self.batch_size, batch_sharding(self.mesh, 2)
        for start in range(0, n, b):
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                tok, valid = self._text_tokens(params, put(pad_rows(tokens[start : start + b], b), sharding))
            k = min(b, n - start)
            yield start, np.asarray(tok)[:k, :length], np.asarray(valid)[:k, :length]
            if progress is not None:
                progress(k)

    def text_tokens(
        self, params: Any, tokens: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """All of `text_token_batches`, concatenated: ([n, L', D_tok], [n, L'])."""
        parts = list(self.text_token_batches(params, tokens, progress))
        if not parts:
            return np.zeros((0, 1, self.token_shape[1]), np.float32), np.zeros((0, 1), bool)
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])

    def put_classes(self, tokens: np.ndarray, valid: np.ndarray, budget: int = SCORE_BLOCK) -> Keys:
        """Class token sets [C, L, D_tok] (and validity), replicated on the mesh for `zeroshot_batch`
        (which scores them `budget` floats per device at a time)."""
        local = self.batch_size // batch_shards(self.mesh)
        chunk = key_chunk(local, self.token_shape[0], tokens.shape[1], len(tokens), budget)
        rows = chunk * -(-len(tokens) // chunk)
        rep = replicated(self.mesh)
        tok, val = pad_rows(np.asarray(tokens, np.float32), rows), pad_rows(np.asarray(valid, bool), rows)
        return Keys(put(tok, rep), put(val, rep), len(tokens), chunk)

    def zeroshot_batch(
        self, params: Any, images: np.ndarray, tags: np.ndarray, classes: Keys
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `image_batch`, with each image's late-interaction logits [batch_size, C] against `classes`
        (image -> class tokens), computed on the devices."""
        if classes.chunk not in self._zeroshot:
            mesh, model, rep = self.mesh, self.model, replicated(self.mesh)

            def encode_and_score(params: Any, images: jax.Array, tags: jax.Array, cls: jax.Array,
                                 cls_valid: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
                tok = model.apply(as_variables(params), images, method=ObjectiveModel.encode_image_tokens)
                every = jnp.ones(tok.shape[:2], bool)
                return sharded_late_interaction(
                    mesh, tok, every, cls, cls_valid, shard="queries", chunk=classes.chunk
                ), tags

            batch = (batch_sharding(mesh, 4), batch_sharding(mesh, 2))
            self._zeroshot[classes.chunk] = jax.jit(
                encode_and_score,
                in_shardings=(self.param_shardings, *batch, rep, rep),
                out_shardings=(rep, rep),
            )
        fn = self._zeroshot[classes.chunk]
        logits, out_tags = self._global_batch(fn, params, images, tags, classes.tokens, classes.valid)
        return logits[:, : classes.count], out_tags
