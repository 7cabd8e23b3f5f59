"""Training sources: the corpora `config.data` names, as grain datasets of `Item`s.

A source is one corpus: its files (one format, told by the extension), a
mixing weight, and its caption policy (which field is the AltText, which the
VeCap caption, and its `vecap_prob`). `config.data.train_files` alone is the
one-source case (it keeps config.seed, so its draws are those of earlier
versions); `config.data.sources` names several:

    config.data.sources = {
        "dfn": dict(files="/data/dfn/{00000..01023}.tar", weight=0.5),           # AltTexts only
        "vecap": dict(files="/data/vecap/train-*.array_record", weight=0.5, vecap_prob=0.5),
    }

Formats:

    .array_record  records.py's shards: random access, so a global shuffle per
                   epoch and a position per example (exact, layout-free resume)
    .tar           img2dataset's WebDataset tars (KEY.jpg/.png/.webp, KEY.txt, KEY.json), streamed
    .parquet       tables with an image-bytes column and caption columns (pyarrow), streamed

Each source's randomness (file and record order, each example's crop and
caption draw) is seeded by `source_seed(config.seed, name)`: a function of the
run's seed and the source's own name, never of the other sources, so adding a
corpus does not change another's draws.

An `Item` is one example's coordinates: (source, epoch, index) and, for the
streamed formats, the raw sample read from the file (for ArrayRecord the
record is read later, in a reader thread, from the index). `index` is the
record index for ArrayRecord, and `file_index * 2**32 + sample_index` for the
streamed formats (the example's place in its file, whatever reads it).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grain

from veclip_jax.data import records, seeds
from veclip_jax.data.paths import expand_paths
from veclip_jax.data.readers.webdataset import iter_tar_samples

if TYPE_CHECKING:
    import ml_collections

log = logging.getLogger(__name__)

ARRAY_RECORD, WEBDATASET, PARQUET = "array_record", "webdataset", "parquet"
# Told by the file name's extension (case-insensitive).
FORMAT_OF_EXTENSION = {".array_record": ARRAY_RECORD, ".tar": WEBDATASET, ".parquet": PARQUET}
# "" in a *_field means the format's default; "none" ignores that caption.
DEFAULT_FIELDS = {
    # (alt_text_field, vecap_text_field, image_field)
    ARRAY_RECORD: ("alt_text", "vecap_text", "jpeg"),
    WEBDATASET: ("txt", "none", ""),  # image: the first .jpg/.jpeg/.png/.webp member
    PARQUET: ("caption", "none", ""),  # image: the first of the columns jpg, jpeg, png, webp, image
}
PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")
SAMPLE_BITS = 32  # streamed formats: index = file_index << SAMPLE_BITS | sample index in the file


class SourceError(ValueError):
    """A source of config.data that cannot be read as configured (named in the message)."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One training corpus, resolved: plain values, pickled to worker processes."""

    name: str  # "" for the one source of data.train_files
    index: int  # its place in the mixture (the order of config.data.sources)
    format: str
    files: tuple[str, ...]
    weight: float
    vecap_prob: float
    alt_text_field: str
    vecap_text_field: str
    image_field: str
    seed: int  # the base of every random draw of this source
    num_records: int = 0  # ArrayRecord: records over all its shards; streamed formats: 0 (unknown)

    @property
    def label(self) -> str:
        """How logs and errors name the source."""
        return f"data.sources.{self.name}" if self.name else "data.train_files"

    @property
    def streamed(self) -> bool:
        return self.format != ARRAY_RECORD


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One example's coordinates (and, for streamed formats, its raw sample)."""

    source: int
    epoch: int
    index: int
    payload: Any = None  # webdataset: {extension: bytes}; parquet: {column: value}; ArrayRecord: None
    position: int = -1  # ArrayRecord pipelines: the example's place in this process's stream


@dataclasses.dataclass(frozen=True, slots=True)
class Skipped:
    """Stands in for an example that could not be used; the batcher counts it by source and reason."""

    reason: str
    source: int = 0
    position: int = -1


def source_seed(seed: int, name: str) -> int:
    """The seed of source `name`: config.seed for the unnamed source, else a hash of (seed, name)."""
    if not name:
        return int(seed)
    return seeds.example_seed(int(seed), seeds.STREAM_SOURCE, *name.encode())


def format_of(files: list[str], label: str) -> str:
    """The one format of a source's files, from their extensions; SourceError if mixed or unknown."""
    found = {}
    for f in files:
        ext = next((e for e in FORMAT_OF_EXTENSION if f.lower().endswith(e)), None)
        if ext is None:
            raise SourceError(
                f"{label}: cannot tell the format of {f} from its extension "
                f"(known: {', '.join(FORMAT_OF_EXTENSION)})"
            )
        found.setdefault(FORMAT_OF_EXTENSION[ext], f)
    if len(found) > 1:
        raise SourceError(f"{label}: one source holds one format, got {', '.join(found.values())}")
    return next(iter(found))


def _check_stream_file(path: str, label: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{label}: file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{label}: a directory, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{label}: file not readable: {path}")


def _resolve(
    name: str,
    index: int,
    files_spec: str,
    weight: float,
    vecap_prob: float,
    fields: tuple[str, str, str],
    seed: int,
) -> SourceSpec:
    label = f"data.sources.{name}" if name else "data.train_files"
    try:
        files = expand_paths(files_spec, what=f"{label} files")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{label}: {e}") from None
    if not files:
        raise SourceError(f"{label}: no files given")
    fmt = format_of(files, label)
    num_records = 0
    if fmt == ARRAY_RECORD:
        counted = records.shard_counts(files)  # opens each shard: a bad one fails here, by name
        num_records = sum(n for _, n in counted)
        if num_records == 0:
            raise SourceError(f"{label}: the shards hold no records: {files_spec}")
    else:
        for f in files:
            _check_stream_file(f, label)
    defaults = DEFAULT_FIELDS[fmt]
    alt, vecap, image = (given or default for given, default in zip(fields, defaults, strict=True))
    if fmt == ARRAY_RECORD:
        for field, value in (("alt_text_field", alt), ("vecap_text_field", vecap)):
            if value not in ("alt_text", "vecap_text", "none"):
                raise SourceError(
                    f"{label}.{field}={value!r}: ArrayRecord sources take alt_text, vecap_text or none"
                )
    return SourceSpec(
        name=name,
        index=index,
        format=fmt,
        files=tuple(files),
        weight=float(weight),
        vecap_prob=float(vecap_prob),
        alt_text_field=alt,
        vecap_text_field=vecap,
        image_field=image,
        seed=source_seed(seed, name),
        num_records=num_records,
    )


def resolve_source_specs(
    config: ml_collections.ConfigDict, demo_files: list[str] | None = None
) -> list[SourceSpec]:
    """The sources of `config.data`: its named `sources`, else `train_files` (or the demo shards) as one.

    Every file is checked here (shards opened, streamed files found), so a
    wrong path fails before any work, naming the source and the file.
    """
    d = config.data
    seed = int(config.seed)
    named = dict(d.get("sources") or {})
    if not named:
        spec = d.train_files or ",".join(demo_files or [])
        return [_resolve("", 0, spec, 1.0, float(d.vecap_prob), ("", "", ""), seed)]
    specs = []
    for i, (name, s) in enumerate(named.items()):
        prob = float(s.get("vecap_prob", -1.0))
        specs.append(
            _resolve(
                str(name),
                i,
                s.get("files", ""),
                float(s.get("weight", 1.0)),
                float(d.vecap_prob) if prob < 0 else prob,
                (s.get("alt_text_field", ""), s.get("vecap_text_field", ""), s.get("image_field", "")),
                seed,
            )
        )
    return specs


# --- ArrayRecord: descriptors of (source, epoch, record index), read later ------------------------


class _Describe(grain.transforms.MapWithIndex):
    """(position in a repeated, shuffled range, record or file index) -> Item(source, epoch, index)."""

    def __init__(self, source: int, count: int):
        self.source, self.count = source, count

    def map_with_index(self, position: int, index: int) -> Item:
        return Item(self.source, position // self.count, int(index))


def shuffle_seed(seed: int) -> int:
    """grain's shuffle seed for a source seed (hashed: grain reshuffles epoch e with seed + e)."""
    return seeds.example_seed(seed, seeds.STREAM_SHUFFLE) % 2**32


def epoch_stream(source: int, count: int, seed: int) -> grain.MapDataset:
    """Item(source, epoch, i) for i in a fresh permutation of range(count) per epoch, forever."""
    return (
        grain.MapDataset.range(count)
        .shuffle(seed=shuffle_seed(seed))
        .repeat(None)
        .map_with_index(_Describe(source, count))
    )


# --- streamed formats: one file at a time, with a resumable position ------------------------------


class FileIterDataset(grain.IterDataset):
    """The samples of one tar or Parquet file as Items (or Skipped), with a resumable position.

    A file that cannot be opened, or that is damaged part-way, yields one
    Skipped("unreadable_file") (after the samples before the damage) and ends;
    a readable file without samples yields one Skipped("empty_file").
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
        if isinstance(sample, str):  # missing_input / unreadable_input: the file, counted once
            yield "unreadable_file"
            return
        yield sample[1]


def _parquet_items(path: str) -> Iterator[dict[str, Any] | str]:
    # grain's ParquetIterDataset reads row group by row group; a damaged file fails on open or mid-way.
    from grain.experimental import ParquetIterDataset

    try:
        it = iter(ParquetIterDataset(path))
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            yield row
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
