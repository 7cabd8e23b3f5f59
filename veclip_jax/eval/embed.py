"""Streaming, sharded image embedding: each process reads and decodes only its own slice.

Process p of P takes the examples [n*p/P, n*(p+1)/P) of a source, reads and
preprocesses them in a grain pipeline (threads, a bounded prefetch buffer) and
passes batches of batch_size/P rows to the jitted encoder, which embeds the
global batch over the mesh and hands every process all of its embeddings,
each tagged with its example index (and label). Memory: the prefetch buffer's
images and the [n, D] embeddings, never the dataset. The numbers do not depend
on the number of devices or processes (tests/test_eval_tasks.py checks 1, 8
devices and 2 processes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np

from veclip_jax.eval.datasets import load_image
from veclip_jax.run.inference import Encoders

# PIL image or RGB array -> its pixels [S, S, 3], not normalised: uint8 (EvalPreprocess's "bicubic",
# "bilinear") or float in [0, 255] ("tf_bilinear"). The model normalises them with its image mean/std
# inside the jitted encoder (models/clip.py), so the batches cross to the devices as uint8.
Preprocess = Callable[[Any], np.ndarray]


def pixel_dtype(preprocess: Preprocess) -> np.dtype:
    """The dtype the images of `preprocess` travel in: its `dtype` (EvalPreprocess's), else float32
    (any pixel values, exactly). One per run: every process's batches must agree (a collective)."""
    return np.dtype(getattr(preprocess, "dtype", np.float32))


@dataclasses.dataclass
class _Load:
    """Example index -> {"image": preprocessed, "tag": [index, label]} (a grain map, run in threads)."""

    source: Any
    preprocess: Preprocess
    image_size: int
    dtype: np.dtype = np.dtype(np.float32)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        example = self.source[int(index)]
        try:
            if getattr(self.preprocess, "fast", False):  # decodes what it is given (EvalPreprocess.load)
                image = np.asarray(self.preprocess.load(example["image"]))
            else:
                image = np.asarray(self.preprocess(load_image(example["image"])))
            if image.dtype != self.dtype:
                if self.dtype == np.uint8:
                    raise TypeError(f"preprocessing gave {image.dtype} pixels, its dtype says uint8")
                image = image.astype(self.dtype)
        except Exception as e:
            what = example["image"] if isinstance(example["image"], str) else f"example {index}"
            raise ValueError(f"cannot read the image of {what}: {type(e).__name__}: {e}") from e
        if image.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"preprocessing gave {image.shape}, the model takes {self.image_size} px")
        return {"image": image, "tag": np.asarray([index, example.get("label", -1)], np.int32)}


class Progress:
    """A tqdm bar on process 0 (images/s), silent elsewhere or when disabled."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool):
        self.bar = None
        self.count, self.t0 = 0, time.perf_counter()
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> float:
        """Closes the bar; returns the rate (items per second) it measured."""
        if self.bar is not None:
            self.bar.close()
        return self.count / max(time.perf_counter() - self.t0, 1e-9)


# (params, this process's images, tags) -> (per-image outputs of the global batch, its tags):
# Encoders.image_batch and its token-wise siblings.
BatchEncoder = Callable[[Any, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def embed_images(
    encoders: Encoders,
    params: Any,
    source: Any,
    preprocess: Preprocess,
    *,
    desc: str = "images",
    progress: bool = False,
    num_threads: int | None = None,
    encode: BatchEncoder | None = None,
    out_shape: tuple[int, ...] | None = None,
    out_dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(embeddings float32 [n, D], labels int [n] (-1 where none), images per second) of all of `source`.

    Every process calls it with the same source (a collective); each reads
    only its slice and gets everyone's embeddings. `encode` replaces
    `encoders.image_batch` (then each image's output has `out_shape` and
    `out_dtype`: token-wise, its patch tokens or its class scores' top 5).
    """
    encode = encode or encoders.image_batch
    out_shape = out_shape if out_shape is not None else (encoders.model.towers.embed_dim,)
    n = len(source)
    procs, me = jax.process_count(), jax.process_index()
    local_b = encoders.local_batch_size
    start, stop = n * me // procs, n * (me + 1) // procs
    steps = math.ceil(math.ceil(n / procs) / local_b)  # every process runs the largest slice's count
    threads = num_threads or max(1, min(8, os.cpu_count() or 1))
    size = encoders.model.towers.image_size
    dtype = pixel_dtype(preprocess)
    ds = (
        grain.MapDataset.range(start, stop)
        .map(_Load(source, preprocess, size, dtype))
        .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * local_b, 16)))
        .batch(local_b, drop_remainder=False)
    )
    it = iter(ds)
    embeds = np.zeros((n, *out_shape), out_dtype)
    labels = np.full((n,), -1, np.int64)
    seen = np.zeros((n,), bool)
    bar = Progress(n, desc, "img", progress)
    try:
        for _ in range(steps):
            batch = next(it, None)
            images = np.zeros((local_b, size, size, 3), dtype)
            tags = np.full((local_b, 2), -1, np.int32)
            if batch is not None:
                k = len(batch["tag"])
                images[:k], tags[:k] = batch["image"], batch["tag"]
            emb, out = encode(params, images, tags)
            rows = out[:, 0] >= 0
            idx = out[rows, 0]
            embeds[idx], labels[idx], seen[idx] = emb[rows], out[rows, 1], True
            bar.update(int(rows.sum()))
    finally:
        rate = bar.close()
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {n} examples were not embedded")
    return embeds, labels, rate
