"""A reader lane's stream of one source: its files read one at a time, round-robin, shuffled in windows.

A lane is a sequential pipeline in one thread (data/pipeline.py runs
data.num_threads of them per worker process), so its output does not depend
on thread timing, and its state is exact: the next file, each open file's
sample position, the shuffle window's start. Tar samples and Parquet rows
leave here raw (Item.payload); data/preprocess.py parses them with the
converter's readers (readers/).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import grain

from veclip_jax.data import seeds
from veclip_jax.data.readers.parquet import bounded_batches
from veclip_jax.data.readers.webdataset import iter_tar_samples
from veclip_jax.data.sources import (
    ARRAY_RECORD,
    SAMPLE_BITS,
    WEBDATASET,
    Item,
    Skipped,
    SourceSpec,
    epoch_stream,
)

log = logging.getLogger(__name__)


# --- streamed formats: one file at a time, with a resumable position ------------------------------


class FileIterDataset(grain.IterDataset):
    """The samples of one tar or Parquet file as Items (or Skipped), with a resumable position.

    A file that cannot be opened, or that is damaged part-way, yields one
    Skipped("unreadable_file") (after the samples before the damage) and ends;
    a readable file without samples yields one Skipped("empty_file"); a tar
    sample with a member over readers/webdataset.py's bound, Skipped("bad_record").
    """

    def __init__(self, spec: SourceSpec, item: Item):
        super().__init__()
        self.spec, self.epoch, self.file_index = spec, item.epoch, item.index

    def __iter__(self) -> grain.DatasetIterator:
        return _FileIterator(self)

    def __str__(self) -> str:
        return f"FileIterDataset({self.spec.files[self.file_index]})"


class _FileIterator(grain.DatasetIterator):
    def __init__(self, ds: FileIterDataset):
        super().__init__()
        self._ds = ds
        self._path = ds.spec.files[ds.file_index]
        self._next = 0  # samples (and skips) handed out so far
        self._gen: Iterator | None = None

    def _open(self) -> Iterator:
        gen = (_tar_items if self._ds.spec.format == WEBDATASET else _parquet_items)(self._path)
        for _ in range(self._next):  # resume: pass what was handed out before
            next(gen, None)
        return gen

    def __next__(self) -> Item | Skipped:
        if self._gen is None:
            self._gen = self._open()
        ds = self._ds
        n = self._next
        try:
            value = next(self._gen)
        except StopIteration:
            if n:
                raise  # the file is done
            # Counted once, so a stream of sample-less files never loops unseen.
            self._next += 1
            log.warning("%s: %s holds no samples: skipped", ds.spec.label, self._path)
            return Skipped("empty_file", ds.spec.index)
        self._next += 1
        if value == "bad_record":  # one sample of a readable file (readers/webdataset.py logged why)
            return Skipped(value, ds.spec.index)
        if isinstance(value, str):
            log.warning("%s: %s is unreadable (from sample %d on): skipped", ds.spec.label, self._path, n)
            return Skipped(value, ds.spec.index)
        return Item(ds.spec.index, ds.epoch, (ds.file_index << SAMPLE_BITS) | n, value)

    def get_state(self) -> dict[str, Any]:
        return {"next": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self._closed = False
        self._next = int(state["next"])

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        self._closed = True


def _tar_items(path: str) -> Iterator[dict[str, bytes] | str]:
    for sample in iter_tar_samples(path):
        if sample == "bad_record":  # one sample (a member over the size bound): the tar goes on
            yield sample
            continue
        if isinstance(sample, str):  # missing_file (gone since the start) / unreadable_file: once
            yield "unreadable_file"
            return
        yield sample[1]


def _parquet_items(path: str) -> Iterator[dict[str, Any] | str]:
    # Row group by row group, in batches of bounded memory (grain's ParquetIterDataset decodes a
    # whole row group, which a small file can make gigabytes); a damaged file fails on open or
    # mid-way, one with an oversized row group before a row is read.
    try:
        for batch in bounded_batches(path):
            yield from batch.to_pylist()
    except Exception:  # pyarrow raises ArrowInvalid, OSError, ...: the rest of the file is lost
        yield "unreadable_file"


class _OpenFile(grain.transforms.Map):
    """Item(source, epoch, file index) -> that file's FileIterDataset."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec

    def map(self, item: Item) -> FileIterDataset:
        return FileIterDataset(self.spec, item)


# Files read at once by one reader lane, round-robin; the shuffle window then
# mixes samples of these files.
FILES_PER_LANE = 2


class RoundRobinFilesIterDataset(grain.IterDataset):
    """The samples of a stream of files, `cycle_length` files open at once, taken in turn, in one thread.

    grain's InterleaveIterDataset does the same with a thread per open file;
    here a lane is already a thread of its own, and its files' per-sample
    hand-offs between threads cost as much CPU as reading the tar or Parquet
    sample itself (measured on the 2-core dev machine: 0.59 ms of CPU a tar
    sample through grain's, 0.29 ms read here; the effect on records/s is in
    `python -m veclip_jax.bench.input --datasets=formats`). To hide a slow
    filesystem's latency, raise data.num_threads (more lanes).

    State: the next file's position in `files`, whose turn it is, and each
    open file's (position, FileIterDataset state): exact resume.
    """

    def __init__(self, files: grain.MapDataset, cycle_length: int):
        super().__init__()
        self.files, self.cycle_length = files, cycle_length

    def __iter__(self) -> grain.DatasetIterator:
        return _RoundRobinFilesIterator(self)

    def __str__(self) -> str:
        return f"RoundRobinFilesIterDataset(cycle_length={self.cycle_length})"


class _RoundRobinFilesIterator(grain.DatasetIterator):
    def __init__(self, ds: RoundRobinFilesIterDataset):
        super().__init__()
        self._ds = ds
        self._next_file = 0
        self._turn = 0
        # One slot per open file: (position in ds.files, its iterator), None before its first file.
        self._slots: list[tuple[int, grain.DatasetIterator] | None] = [None] * ds.cycle_length

    def _open(self, position: int, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
        it = iter(self._ds.files[position])
        if state is not None:
            it.set_state(state)
        return it

    def __next__(self) -> Item | Skipped:
        # The file stream repeats forever; a file that ends hands its slot to the next file.
        while True:
            slot = self._slots[self._turn]
            if slot is None:
                slot = self._slots[self._turn] = (self._next_file, self._open(self._next_file))
                self._next_file += 1
            try:
                value = next(slot[1])
            except StopIteration:
                slot[1].close()
                self._slots[self._turn] = None
                continue
            self._turn = (self._turn + 1) % len(self._slots)
            return value

    def get_state(self) -> dict[str, Any]:
        return {
            "next_file": self._next_file,
            "turn": self._turn,
            "slots": [None if s is None else {"file": s[0], "state": s[1].get_state()} for s in self._slots],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self._closed = False
        self._next_file, self._turn = int(state["next_file"]), int(state["turn"])
        self._slots = [
            None if s is None else (int(s["file"]), self._open(int(s["file"]), s["state"]))
            for s in state["slots"]
        ]

    def close(self) -> None:
        for s in self._slots:
            if s is not None:
                s[1].close()
        self._slots = [None] * len(self._slots)
        self._closed = True


class WindowShuffleIterDataset(grain.IterDataset):
    """Samples shuffled in consecutive windows of `window_size` (a permutation per window), resumable.

    The semantics of grain's WindowShuffleIterDataset (a tumbling window; the
    state is the parent's state at the window's start, the window's number
    and the place in it, so a resume re-reads at most one window), with the
    permutation drawn at once by numpy: grain's draws each position with
    its own index_shuffle call, about 0.5 ms an element on this CPU (as much
    as decoding a tenth of an image).
    """

    def __init__(self, parent: grain.IterDataset, window_size: int, seed: int):
        super().__init__(parent)
        self.window_size, self.seed = window_size, seed

    def __iter__(self) -> grain.DatasetIterator:
        return _WindowShuffleIterator(self._parent.__iter__(), self.window_size, self.seed)

    def __str__(self) -> str:
        return f"WindowShuffleIterDataset(window_size={self.window_size})"


class _WindowShuffleIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, window_size: int, seed: int):
        super().__init__(parent)
        self._size, self._seed = window_size, seed
        self._window_index, self._pos = 0, 0
        self._window: list[Any] = []
        self._window_start = parent.get_state()

    def _fill(self) -> None:
        self._window_start = self._parent.get_state()
        window = list(itertools.islice(self._parent, self._size))
        order = seeds.example_rng(self._seed, self._window_index).permutation(len(window))
        self._window = [window[i] for i in order]
        self._pos = 0

    def __next__(self) -> Any:
        if self._pos >= len(self._window):
            if self._window:
                self._window_index += 1
            self._fill()
            if not self._window:
                raise StopIteration
        value = self._window[self._pos]
        self._window[self._pos] = None  # handed out: not kept alive by the window
        self._pos += 1
        return value

    def get_state(self) -> dict[str, Any]:
        return {
            "window_start": copy.deepcopy(self._window_start),
            "window_index": self._window_index,
            "pos": self._pos,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["window_start"]))
        self._window_index = int(state["window_index"])
        self._fill()
        self._pos = min(int(state["pos"]), len(self._window))


def lane_stream(
    spec: SourceSpec, *, offset: int, stride: int, shuffle_buffer: int, lane_seed: int
) -> grain.IterDataset:
    """This lane's examples of one source: the positions offset, offset+stride, ... of its stream.

    ArrayRecord: the source's epoch stream of records (read later, by index).
    Streamed formats: its epoch stream of files (a fresh file order per
    epoch), FILES_PER_LANE open at once, samples shuffled in windows of
    `shuffle_buffer`; all in the lane's thread.
    """
    if spec.format == ARRAY_RECORD:
        return epoch_stream(spec.index, spec.num_records, spec.seed)[offset::stride].to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        )
    files = epoch_stream(spec.index, len(spec.files), spec.seed)[offset::stride].map(_OpenFile(spec))
    ds = RoundRobinFilesIterDataset(files, cycle_length=FILES_PER_LANE)
    if shuffle_buffer > 1:
        ds = WindowShuffleIterDataset(ds, window_size=shuffle_buffer, seed=lane_seed)
    return ds
