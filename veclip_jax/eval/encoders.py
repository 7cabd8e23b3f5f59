"""Jitted image and text encoders for parameters on a mesh: numpy in, L2-normalised numpy out.

Used by evaluation during training (parameters as the train state holds them,
sharded) and by `veclip_jax.load` (one device). Inputs are cut into batches of
a fixed size (the last one padded), so each encoder compiles once. Every
process passes the same full inputs and gets the full outputs (multi-host safe:
each device takes its rows of the global batch from the host copy).

`image_batch` is the streaming form (veclip_jax/eval/embed.py): each process
passes only its own rows, with an int32 tag per row (its example index and
label), and every process gets the whole global batch's embeddings and tags,
so no process has to read or decode another's images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from veclip_jax.data.image_ops import normalize
from veclip_jax.models.clip import CLIP
from veclip_jax.parallel.mesh import batch_sharding, replicated
from veclip_jax.parallel.rules import DEFAULT_RULES, LogicalRules


class Encoders:
    """`images(params, uint8 [n,S,S,3])` and `texts(params, int32 [n,L])` -> float32 [n, embed_dim]."""

    def __init__(
        self,
        model: CLIP,
        mesh: Mesh,
        param_shardings: Any,
        batch_size: int,
        rules: LogicalRules = DEFAULT_RULES,
    ):
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size % shards:
            raise ValueError(f"encoder batch size {batch_size} does not divide over {shards} batch shards")
        self.model, self.mesh, self.rules, self.batch_size = model, mesh, rules, batch_size

        def encode_image(params: Any, images: jax.Array) -> jax.Array:
            return model.apply({"params": params}, images, method=CLIP.encode_image)

        def encode_text(params: Any, tokens: jax.Array) -> jax.Array:
            return model.apply({"params": params}, tokens, method=CLIP.encode_text)

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
            return np.zeros((0, self.model.embed_dim), np.float32)
        return np.concatenate(outs)

    def images(self, params: Any, images: np.ndarray) -> np.ndarray:
        """uint8 [n, S, S, 3] RGB (S = the model's image size) -> [n, embed_dim]."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = normalize(images)
        return self._run(self._image, params, images.astype(np.float32))

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

    def image_batch(self, params: Any, images: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows -> (embeddings [batch_size, D], tags [batch_size, k]) of the global batch.

        images: float32 [local_batch_size, S, S, 3], preprocessed; tags: int32
        [local_batch_size, k] (padding rows are the caller's to mark). Every
        process calls it the same number of times (a collective).
        """
        mesh, n = self.mesh, self.batch_size
        with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules):
            glob = [
                jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, (n, *x.shape[1:]))
                for x in (np.asarray(images, np.float32), np.asarray(tags, np.int32))
            ]
            emb, out_tags = self._tagged(params, *glob)
        return np.asarray(emb), np.asarray(out_tags)
