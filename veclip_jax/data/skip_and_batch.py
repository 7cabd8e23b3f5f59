"""Skipping bad examples and batching the rest, counting every skip by source and reason.

Bad examples (data/skips.py BAD_REASONS) are skipped, never silently: each
batch carries the number skipped while filling it, by source and reason
(field "bad_counts", int32 [sources, reasons]) and the examples it holds per
source ("source_counts"); these small arrays travel with the batch out of the
worker processes, and the TrainIterator (data/train_iterator.py) removes
them, keeps running totals (part of its checkpointed state) and checks
windows of data.bad_window examples against data.max_bad_fraction.

Runs in the worker processes (pickled to them): no jax here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from veclip_jax.data.preprocess import Example
from veclip_jax.data.skips import BAD_REASONS
from veclip_jax.data.sources import Skipped

_REASON_INDEX = {r: i for i, r in enumerate(BAD_REASONS)}


class TooManyBadRecordsError(RuntimeError):
    """More than data.max_bad_fraction of a window of records was skipped."""


def too_many_bad_message(bad: Mapping[str, int], seen: int, max_bad_fraction: float, window: int) -> str:
    """The error message: the skips by reason, the fraction, the limit and where to look."""
    n_bad = sum(bad.values())
    reasons = ", ".join(f"{k}={v}" for k, v in bad.items() if v)
    return (
        f"{n_bad} of {seen} records ({n_bad / max(seen, 1):.2%}) were skipped as bad ({reasons}); "
        f"data.max_bad_fraction={max_bad_fraction:g} allows at most {max_bad_fraction:.2%} "
        f"per window of data.bad_window={window} records. Check the shards (decode a few with "
        "veclip_jax.data.records.RecordReader), or raise data.max_bad_fraction."
    )


class SkipBadAndBatchIterDataset(grain.IterDataset):
    """Batches good examples, skipping Skipped ones and counting them per batch.

    grain's own `batch` cannot skip, and a `filter` would lose the reason; this
    is the one piece of machinery grain does not provide. Each batch gets
    "bad_counts" int32 [sources, len(BAD_REASONS)] (the skips met while filling
    it), "source_counts" int32 [sources] (its examples per source) and, when
    `positions`, "positions" int64 [consumed] (every stream position it used).
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        *,
        num_sources: int,
        positions: bool,
        max_bad_fraction: float,
        bad_window: int,
        give_up_after: int,
    ):
        super().__init__(parent)
        self.batch_size = batch_size
        self.num_sources = num_sources
        self.positions = positions
        self.max_bad_fraction = max_bad_fraction
        self.bad_window = bad_window
        self.give_up_after = give_up_after

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipBadAndBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"SkipBadAndBatchIterDataset(batch_size={self.batch_size})"


class _SkipBadAndBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: SkipBadAndBatchIterDataset):
        super().__init__(parent)
        self._ds = ds

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        good: list[dict[str, np.ndarray]] = []
        bad = np.zeros((ds.num_sources, len(BAD_REASONS)), np.int32)
        per_source = np.zeros(ds.num_sources, np.int32)
        used: list[int] = []
        n_bad = 0
        while len(good) < ds.batch_size:
            element: Example | Skipped = next(self._parent)
            used.append(element.position)
            if isinstance(element, Skipped):
                bad[element.source, _REASON_INDEX[element.reason]] += 1
                n_bad += 1
                # The main process checks windows from the counts, but only
                # once a batch arrives: a stream of nothing but bad records
                # would never deliver one. Fail here instead.
                seen = n_bad + len(good)
                if (
                    n_bad >= ds.bad_window and n_bad / seen > ds.max_bad_fraction
                ) or n_bad > ds.give_up_after:
                    counts = dict(zip(BAD_REASONS, bad.sum(0).tolist(), strict=True))
                    raise TooManyBadRecordsError(
                        too_many_bad_message(counts, seen, ds.max_bad_fraction, ds.bad_window)
                    )
                continue
            good.append(element.arrays)
            per_source[element.source] += 1
        batch = {k: np.stack([e[k] for e in good]) for k in good[0]}
        batch["bad_counts"] = bad
        batch["source_counts"] = per_source
        if ds.positions:
            batch["positions"] = np.asarray(used, np.int64)
        return batch

    def get_state(self) -> dict[str, Any]:
        # A batch is complete when returned, so the parent's position is all
        # the state there is (as in grain's own batch).
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return f"SkipBadAndBatchIterator(batch_size={self._ds.batch_size})"
