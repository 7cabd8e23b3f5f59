"""The training batch's schema: every key a batch may carry, its rank, dtype and shape rule.

One table, read by everyone who makes or takes a batch: the input pipeline
(what it makes, data/), the train step (its input shardings, train/step.py),
model initialisation and the compile check (zero or abstract batches), and the
objectives (each declares the keys it reads in `Objective.inputs`). Plain
Python, no jax: the data worker processes import it.

| key         | dtype   | shape           | what                                                     |
|-------------|---------|-----------------|----------------------------------------------------------|
| image       | uint8   | [B, S, S, 3]    | the RandomResizedCrop's RGB pixels (not normalised)      |
| views       | uint8   | [B, V, S, S, 3] | V MoCo v2 views of the image (data/augment.py)           |
| tokens      | int32   | [B, L]          | the caption (AltText or VeCap), end-of-text and padding  |
| tokens_eda  | int32   | [B, L]          | the caption after one EDA operation (data/text_augment.py) |
| tokens_mlm  | int32   | [B, L]          | the caption BERT-masked with model.text.mask_id          |
| mlm_labels  | int32   | [B, L]          | the masked positions' original ids, -1 elsewhere         |

S = model.vision.image_size, L = model.text.context_length, V = the views an
objective reads (data.augment.views). Token rows the towers encode name the
prefix of their outputs (`encoded_as`: "text" for tokens, models/clip.py).

Images travel as uint8 (a quarter of float32's bytes, and no normalisation on
the host's CPU): the model normalises them with its image mean/std inside the
jitted step (models/clip.py `normalize_pixels`), then casts to its compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
    """One batch key: dtype, per-example shape (symbols S, L, V or sizes), and what the towers make of it."""

    dtype: str
    shape: tuple[str | int, ...]  # after the batch axis
    encoded_as: str | None = None  # token rows the text tower encodes: the prefix of their outputs

    @property
    def ndim(self) -> int:
        """The array's rank, batch axis included."""
        return 1 + len(self.shape)


FIELDS: dict[str, Field] = {
    "image": Field("uint8", ("S", "S", 3)),
    "views": Field("uint8", ("V", "S", "S", 3)),
    "tokens": Field("int32", ("L",), encoded_as="text"),
    "tokens_eda": Field("int32", ("L",), encoded_as="eda"),
    "tokens_mlm": Field("int32", ("L",), encoded_as="mlm"),
    "mlm_labels": Field("int32", ("L",)),
}
# What a batch holds unless an objective reads more (or, like DeCLIP, no standard crop).
DEFAULT_KEYS = ("image", "tokens")
# The token rows the text tower encodes, by the prefix of their outputs: {"text": "tokens", ...}.
TEXT_INPUTS = {f.encoded_as: k for k, f in FIELDS.items() if f.encoded_as}


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes the shape symbols stand for."""

    image_size: int  # S
    context_length: int  # L
    views: int = 0  # V


def check_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """`keys` as a tuple, or ValueError naming the unknown ones; every batch has "tokens"."""
    keys = tuple(keys)
    unknown = [k for k in keys if k not in FIELDS]
    if unknown:
        raise ValueError(f"batch keys {unknown} are not in the schema (veclip_jax/batch.py): {[*FIELDS]}")
    if "tokens" not in keys:
        raise ValueError(f"batch keys {list(keys)} lack 'tokens' (every batch has the caption)")
    return keys


def example_shape(key: str, dims: Dims) -> tuple[int, ...]:
    """The shape of one example's `key` (no batch axis)."""
    sizes = {"S": dims.image_size, "L": dims.context_length, "V": dims.views}
    shape = tuple(sizes[d] if isinstance(d, str) else d for d in FIELDS[key].shape)
    if key == "views" and dims.views < 1:
        raise ValueError("batch key 'views' needs Dims.views >= 1 (the objective's views)")
    return shape


def shapes(keys: Iterable[str], batch_size: int, dims: Dims) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of a batch of `batch_size` holding `keys`."""
    return {k: ((batch_size, *example_shape(k, dims)), np.dtype(FIELDS[k].dtype)) for k in check_keys(keys)}


def zeros(keys: Iterable[str], batch_size: int, dims: Dims) -> dict[str, np.ndarray]:
    """A batch of zeros holding `keys` (for initialisation and tracing)."""
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes(keys, batch_size, dims).items()}
