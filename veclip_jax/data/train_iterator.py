"""The training iterator and its checkpointed state: what was consumed, and the skip counts.

TrainIterator wraps the built pipeline (data/pipeline.py) and is what the
trainer checkpoints. Two kinds of state, by the sources' formats:

ArrayRecord only: every example carries its position in this process's
stream, and every batch the positions it consumed. The state is which
positions are consumed (a frontier and the few beyond it), so a run resumes
exactly, to the same next batches, and also with a different
data.num_workers (then only the grouping of examples into batches differs).

Any streamed source (tar, Parquet): the state is grain's own (every lane's
file positions, shuffle windows and mix counters): exact resume, with the
same data.num_workers, num_threads and process count (a change is refused,
naming the field).

Both also hold the skip totals by source and reason and the current
max_bad_fraction window. The layout of the state dict and STATE_VERSION are
what checkpoints hold: change them only with a new version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from veclip_jax.data.skip_and_batch import TooManyBadRecordsError, too_many_bad_message
from veclip_jax.data.skips import BAD_REASONS
from veclip_jax.data.sources import Item, SourceSpec
from veclip_jax.errors import UserError

STATE_VERSION = 2
# The layout of a streamed pipeline's state (sources.py's lane iterators); 1 was grain's threaded
# InterleaveIterDataset and WindowShuffleIterDataset, whose states these do not read.
STREAMED_READER = 2


class InputStateError(UserError, ValueError):
    """A saved input position that this configuration cannot continue from (the field is named).

    A UserError: the checkpoint is sound, the config differs from the one that saved it.
    """


# --- the ArrayRecord stream: positions -------------------------------------------------------------


class TagPosition(grain.transforms.MapWithIndex):
    """(i, Item) -> the Item with position base + i: its place in this process's stream."""

    def __init__(self, base: int):
        self.base = base

    def map_with_index(self, index: int, item: Item) -> Item:
        return dataclasses.replace(item, position=self.base + index)


class NotConsumed(grain.transforms.Filter):
    """Drops the positions a resumed run consumed before (beyond its frontier)."""

    def __init__(self, consumed: frozenset[int]):
        self.consumed = consumed

    def filter(self, item: Item) -> bool:
        return item.position not in self.consumed


@dataclasses.dataclass
class _Consumed:
    """Positions of this process's stream used by delivered batches: all below `frontier`, and `beyond`."""

    frontier: int = 0
    beyond: set[int] = dataclasses.field(default_factory=set)

    def add(self, positions: np.ndarray) -> None:
        self.beyond.update(positions.tolist())
        while self.frontier in self.beyond:
            self.beyond.discard(self.frontier)
            self.frontier += 1


# --- the iterator --------------------------------------------------------------------------------


class TrainIterator(grain.DatasetIterator):
    """The training iterator: batches {"image", "tokens"}, the extras asked for, and ids if asked for.

    A grain DatasetIterator, so `get_state`/`set_state` and orbax's
    `grain.checkpoint.CheckpointSave/CheckpointRestore` work on it. Its state
    also holds the skipped-example and per-source totals and the current
    window, so counts and the max_bad_fraction check continue across a restore.
    The pipeline is built on first use (or by `set_state`, at the saved
    position), so a restore starts no worker process twice.

    `bad_counts()` returns {reason: examples skipped so far} for logging,
    `counters()` the same by source and the examples seen per source.
    """

    def __init__(
        self,
        build: Callable[[dict[str, Any] | None], grain.DatasetIterator],
        *,
        specs: list[SourceSpec],
        positional: bool,
        layout: dict[str, int],
        max_bad_fraction: float,
        bad_window: int,
        process_index: int,
    ):
        super().__init__()
        self._build = build
        self._specs = specs
        self._positional = positional
        self._layout = layout
        self.max_bad_fraction = max_bad_fraction
        self.bad_window = bad_window
        self.process_index = process_index
        self._it: grain.DatasetIterator | None = None
        self._start: dict[str, Any] | None = None  # where the built pipeline starts (positional)
        self._consumed = _Consumed()
        self._batches = 0  # delivered since the pipeline was built: which worker is next
        n = len(specs)
        self._bad = np.zeros((n, len(BAD_REASONS)), np.int64)
        self._examples = np.zeros(n, np.int64)
        self._window_bad = dict.fromkeys(BAD_REASONS, 0)
        self._window_seen = 0
        self._native_state: Any = None

    @property
    def _parent(self) -> grain.DatasetIterator:
        if self._it is None:
            self._it = self._build(self._start)
            if self._native_state is not None:
                self._it.set_state(self._native_state)
                self._native_state = None
        return self._it

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        counts = batch.pop("bad_counts")
        per_source = batch.pop("source_counts")
        if self._positional:
            self._consumed.add(batch.pop("positions"))
        self._batches += 1
        n_good = len(batch["tokens"])
        self._window_seen += n_good + int(counts.sum())
        self._bad += counts
        self._examples += per_source
        for reason, c in zip(BAD_REASONS, counts.sum(0).tolist(), strict=True):
            self._window_bad[reason] += c
        # Windows end on batch boundaries: the counts arrive per batch.
        if self._window_seen >= self.bad_window:
            window_bad = sum(self._window_bad.values())
            if window_bad > self.max_bad_fraction * self._window_seen:
                raise TooManyBadRecordsError(
                    f"process {self.process_index}: "
                    + too_many_bad_message(
                        self._window_bad, self._window_seen, self.max_bad_fraction, self.bad_window
                    )
                )
            self._window_bad = dict.fromkeys(BAD_REASONS, 0)
            self._window_seen = 0
        return batch

    def bad_counts(self) -> dict[str, int]:
        """Examples skipped so far by this process (since the run began, across restores), by reason."""
        return {r: int(c) for r, c in zip(BAD_REASONS, self._bad.sum(0), strict=True)}

    def counters(self) -> dict[str, int]:
        """bad_counts(), and with named sources (data.sources) per source: "examples/NAME", "REASON/NAME"."""
        out = self.bad_counts()
        for spec in self._specs:
            if spec.name:
                out[f"examples/{spec.name}"] = int(self._examples[spec.index])
                for r, c in zip(BAD_REASONS, self._bad[spec.index], strict=True):
                    out[f"{r}/{spec.name}"] = int(c)
        return out

    def _next_residue(self) -> int:
        # Workers deliver batches round-robin, worker j serving positions = start + j (mod k).
        k = max(1, self._layout["num_workers"])
        return ((self._start or {}).get("base", 0) + self._batches) % k

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "layout": dict(self._layout),
            "sources": [s.name for s in self._specs],
            "bad_counts": {
                s.name or "": {r: int(c) for r, c in zip(BAD_REASONS, self._bad[s.index], strict=True)}
                for s in self._specs
            },
            "examples": {s.name or "": int(self._examples[s.index]) for s in self._specs},
            "window": {"seen": self._window_seen, "bad": dict(self._window_bad)},
        }
        if self._positional:
            state["position"] = self._consumed.frontier
            state["consumed_beyond"] = sorted(self._consumed.beyond)
            state["next_residue"] = self._next_residue()
        else:
            state["pipeline"] = self._parent.get_state()
            state["streamed_reader"] = STREAMED_READER
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise InputStateError(
                "the saved input position is from an older veclip-jax (no 'version' "
                f"{STATE_VERSION}); start the run in a new workdir, or resume with the version that saved it"
            )
        saved = state["layout"]
        if ("pipeline" in state) == self._positional:  # a streamed state has grain's pipeline state
            formats = ("streamed (tar, Parquet)", "ArrayRecord-only")
            then, now = formats if self._positional else formats[::-1]
            raise InputStateError(
                f"the input position was saved for {then} sources and this run reads {now} ones: "
                "config.data.train_files (or data.sources) changed format since the checkpoint. Resume "
                "with the data it was saved with, or start a new workdir (config.init_from can start "
                "from this one)"
            )
        if saved["process_count"] != self._layout["process_count"]:
            raise InputStateError(
                f"the input position was saved by {saved['process_count']} processes; this run has "
                f"{self._layout['process_count']}: resume with the same number of hosts"
            )
        if self._positional:
            self._resume_positions(state, saved)
        else:
            if state.get("streamed_reader", 1) != STREAMED_READER:
                raise InputStateError(
                    "the saved position of the streamed (tar, Parquet) input is from an earlier veclip-jax "
                    "reader; resume with the version that saved it, or start the run in a new workdir"
                )
            for field in ("num_workers", "num_threads"):
                if saved[field] != self._layout[field]:
                    raise InputStateError(
                        f"config.data.{field}={self._layout[field]}, but the input position was saved with "
                        f"data.{field}={saved[field]}: streamed sources (tar, Parquet) resume only with the "
                        f"same data.{field}; set --config.data.{field}={saved[field]}"
                    )
            if self._it is not None:
                self._it.set_state(state["pipeline"])
            else:
                self._native_state = state["pipeline"]
        names = {s.name or "": s.index for s in self._specs}
        self._bad[:] = 0
        self._examples[:] = 0
        for name, i in names.items():  # a source added since the save starts from zero
            self._bad[i] = [int(state["bad_counts"].get(name, {}).get(r, 0)) for r in BAD_REASONS]
            self._examples[i] = int(state["examples"].get(name, 0))
        self._window_seen = int(state["window"]["seen"])
        self._window_bad = {r: int(state["window"]["bad"].get(r, 0)) for r in BAD_REASONS}

    def _resume_positions(self, state: dict[str, Any], saved: dict[str, int]) -> None:
        if state.get("sources") != [s.name for s in self._specs]:
            raise InputStateError(
                f"the input position was saved for the sources {state.get('sources')}; this run reads "
                f"{[s.name for s in self._specs]}: an ArrayRecord mixture resumes only with the same sources"
            )
        frontier, beyond = int(state["position"]), {int(p) for p in state["consumed_beyond"]}
        k = max(1, self._layout["num_workers"])
        base = frontier
        if saved["num_workers"] == self._layout["num_workers"]:
            # Same workers: worker 0 of the new pipeline takes the residue whose batch is next,
            # so the batches continue exactly as if the run had not stopped.
            base = frontier - (frontier - int(state["next_residue"])) % k
        skip = frozenset(range(base, frontier)) | frozenset(beyond)
        self.close()
        self._closed = False
        self._it = None
        self._start = {"base": base, "skip": skip}
        self._consumed = _Consumed(frontier, set(beyond))
        self._batches = 0

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def __str__(self) -> str:
        return f"TrainIterator(process_index={self.process_index})"


def mix_ratios(counters: Mapping[str, int]) -> dict[str, float]:
    """{"mix/NAME": NAME's share of the examples seen} from `TrainIterator.counters()` (summed over hosts)."""
    seen = {k.split("/", 1)[1]: v for k, v in counters.items() if k.startswith("examples/")}
    total = sum(seen.values())
    return {f"mix/{name}": n / total for name, n in seen.items()} if total else {}
