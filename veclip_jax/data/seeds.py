"""Per-example randomness derived from (config seed, stream, epoch, record index).

Every random choice of the input pipeline (shuffle, crop, caption, views,
EDA, masking) is a pure function of these integers and nothing else: not of
the worker that happens to process the record, the thread, the process count
or the position in a batch.
That is what makes a resumed run, or the same run on a different number of
hosts, see the same crop and caption for record i in epoch e.

The integers are hashed with BLAKE2b, so the result is stable across numpy
versions and platforms (numpy only promises stream stability for its bit
generators, and we use one only once seeded from the hash).
"""

from __future__ import annotations

import hashlib

import numpy as np

# Independent streams: the same (seed, epoch, index) must not give correlated
# crop and caption draws.
STREAM_SHUFFLE = 1
STREAM_CAPTION = 2
STREAM_CROP = 3
STREAM_DEMO = 4
STREAM_SOURCE = 5  # a named source's seed (data/sources.py)
STREAM_WINDOW = 6  # the shuffle window of a streamed source's reader lane
# The extra inputs of SLIP / DeCLIP / FILIP (data/augment.py, data/text_augment.py):
STREAM_VIEW = 7  # view v of an example: example_rng(seed, STREAM_VIEW, epoch, index, v)
STREAM_EDA = 8  # the EDA operation on the chosen caption
STREAM_MLM = 9  # the masked-language-model selection on its tokens


def example_seed(*parts: int) -> int:
    """A 64-bit seed that is a hash of the given integers (any sign, any size)."""
    h = hashlib.blake2b(digest_size=8, person=b"veclipjax")
    for p in parts:
        p = int(p)
        h.update(p.to_bytes((p.bit_length() + 8) // 8 + 1, "little", signed=True))
        h.update(b"|")  # separates parts, so (1, 23) and (12, 3) differ
    return int.from_bytes(h.digest(), "little")


def example_uniform(*parts: int) -> float:
    """A uniform draw in [0, 1) determined by the given integers."""
    # 53 bits: exactly representable as a float64 in [0, 1).
    return (example_seed(*parts) >> 11) * (1.0 / (1 << 53))


def example_rng(*parts: int) -> np.random.Generator:
    """A numpy Generator seeded from the given integers."""
    return np.random.Generator(np.random.PCG64(example_seed(*parts)))
