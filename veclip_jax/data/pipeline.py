"""The training input pipeline: sources (data/sources.py) -> per-process batches, with grain.

Two shapes, chosen by the sources' formats:

ArrayRecord only (random access; one source or a weighted mixture):

    per source: Item(source, epoch, record index), a fresh permutation per
      epoch (grain's index shuffle, seeded by the source's own seed), forever
      → the mixture: grain's MapDataset.mix by weight (a fixed, deterministic
        interleave: source s supplies weight_s of every stretch of the stream)
      → this process's slice: stream positions p, p+P, p+2P, ...
      → per example (reader threads; ReadOptions): read the record (a damaged
        one is skipped as bad_record, its shard named in the log), choose the
        caption (VeCLIP mixing with the source's vecap_prob), decode +
        RandomResizedCrop + normalise, tokenise; and the extras an objective
        asks for (MoCo v2 views, an EDA caption, a BERT-masked caption)
      → skip bad examples and batch (b = batch_size / P), counting per source
      → worker processes (mp_prefetch) or a prefetch thread
      → TrainIterator

    Every example carries its position in this process's stream, and every
    batch the positions it consumed. The iterator's state is which positions
    are consumed (a frontier and the few beyond it), so it resumes exactly,
    to the same next batches, and also with a different data.num_workers
    (then only the grouping of examples into batches differs).

Any streamed source (WebDataset tar, Parquet; ArrayRecord sources may join):

    per reader lane (data.num_threads per worker process, or per process):
      per source: its files in a fresh order per epoch, this lane's share
        (positions lane, lane + lanes, ... of the process's share), two files
        open at once, samples shuffled in windows of data.shuffle_buffer
      → the mixture: grain's IterDataset.mix by weight, keyed by source name
      → per example, in the lane's thread: as above
    → the lanes round-robin → skip bad and batch → worker processes or thread
    → TrainIterator

    The state is grain's own (every lane's file positions, shuffle windows and
    mix counters): exact resume, with the same data.num_workers, num_threads
    and process count (a change is refused, naming the field).

Everything random is a function of (source seed, epoch, example index): the
order of an epoch, and each example's crop, caption and extras, so an example looks
the same whatever the process count, worker count or restart. The P process
slices of an ArrayRecord stream are disjoint and together cover every epoch
exactly once; streamed sources split their files over processes and lanes,
so each file of an epoch is read by one lane of one process.

Bad examples (see BAD_REASONS) are skipped, never silently: each batch carries
the number skipped while filling it, by source and reason (field
"bad_counts", int32 [sources, reasons]) and the examples it holds per source
("source_counts"); these small arrays travel with the batch out of the worker
processes, and TrainIterator removes them, keeps running totals (part of its
checkpointed state) and exposes them as `bad_counts()` and `counters()`. More
than `data.max_bad_fraction` of a window of `data.bad_window` examples (all
sources together) raises TooManyBadRecordsError.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from veclip_jax.data import augment, captions, image_ops, records, seeds, text_augment
from veclip_jax.data import sources as sources_mod
from veclip_jax.data.sources import Item, Skipped, SourceSpec
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer, is_hf_tokenizer_dir, load_tokenizer
from veclip_jax.errors import UserError

if TYPE_CHECKING:  # not imported at run time: worker processes unpickle this module
    import ml_collections

# Why an example was skipped. "bad_record": the bytes are not a record (a
# damaged shard chunk, corrupt data, a newer format version) or a sample's
# metadata is unreadable; "empty_caption": no caption left after cleaning
# (checked first, as it is cheaper); "undecodable_image": no decoder reads the
# image; "missing_image": a sample without an image (tar member, Parquet
# cell); "bad_caption": a caption that is not UTF-8 text; "unreadable_file": a
# tar or Parquet file that cannot be opened or is damaged part-way (counted
# once, where the damage shows); "empty_file": a readable tar or Parquet file
# without a sample (img2dataset writes one for a shard whose downloads all
# failed; counted once, and a source of only such files fails as too bad
# instead of reading them round forever).
BAD_REASONS = (
    "bad_record",
    "empty_caption",
    "undecodable_image",
    "missing_image",
    "bad_caption",
    "unreadable_file",
    "empty_file",
)
_REASON_INDEX = {r: i for i, r in enumerate(BAD_REASONS)}
STATE_VERSION = 2
# The layout of a streamed pipeline's state (sources.py's lane iterators); 1 was grain's threaded
# InterleaveIterDataset and WindowShuffleIterDataset, whose states these do not read.
STREAMED_READER = 2

log = logging.getLogger(__name__)

# The batch keys an objective may ask for beyond "image" and "tokens" (make_train_iterator's
# `extras`); "no_image" is not a key but drops "image" (DeCLIP reads only the views).
EXTRAS = ("views", "no_image", "tokens_eda", "tokens_mlm", "mlm_labels")

__all__ = [
    "BAD_REASONS",
    "EXTRAS",
    "Skipped",
    "TooManyBadRecordsError",
    "TrainIterator",
    "make_train_iterator",
]


class TooManyBadRecordsError(RuntimeError):
    """More than data.max_bad_fraction of a window of records was skipped."""


class InputStateError(UserError, ValueError):
    """A saved input position that this configuration cannot continue from (the field is named).

    A UserError: the checkpoint is sound, the config differs from the one that saved it.
    """


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What the per-example image work needs from the config (plain values: it is pickled to workers)."""

    image_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    decoder: str


@dataclasses.dataclass(frozen=True)
class ExtraSpec:
    """What Preprocess makes beside "tokens" (plain values: pickled to workers).

    image: the RandomResizedCrop "image" (False for "no_image"). views: the
    MoCo v2 "views". eda_alpha: "tokens_eda" when set. mlm and mlm_keys: the
    masking, and which of "tokens_mlm" / "mlm_labels" the batch carries.
    """

    image: bool = True
    views: augment.ViewSpec | None = None
    eda_alpha: float | None = None
    mlm: text_augment.MaskSpec | None = None
    mlm_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Example:
    """One usable example: its arrays, and where it came from (for the batcher's counts)."""

    source: int
    position: int
    arrays: dict[str, np.ndarray]


def _text(value: Any) -> str | None:
    """A caption cell as text: None if missing; ValueError if it is bytes that are not UTF-8."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")  # UnicodeDecodeError is a ValueError
    if isinstance(value, str):
        return value
    raise ValueError(f"caption of type {type(value).__name__}")


def _webdataset_fields(spec: SourceSpec, members: Mapping[str, bytes]) -> tuple[Any, str | None, str | None]:
    """(image, alt, vecap) of a tar sample per the source's fields; KeyError/ValueError when unreadable."""
    meta: Any = None

    def field(name: str) -> str | None:
        nonlocal meta
        if name == "none":
            return None
        if name.startswith("json:"):
            if meta is None:
                raw = members.get("json")
                meta = _load_json(raw) if raw is not None else {}
                if not isinstance(meta, dict):
                    raise KeyError("the .json member is not an object")
            return _text(meta.get(name[5:]))
        return _text(members.get(name))

    alt = field(spec.alt_text_field)
    if alt is None and spec.alt_text_field == "txt" and "json" in members:
        alt = field("json:caption")  # img2dataset writes the caption to both
    if spec.image_field:
        image = members.get(spec.image_field)
    else:
        image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
    return image, alt, field(spec.vecap_text_field)


def _load_json(raw: bytes) -> Any:
    import json

    try:
        return json.loads(raw)
    except ValueError as e:
        raise KeyError(f"the .json member is not JSON: {e}") from None


def _parquet_fields(spec: SourceSpec, row: Mapping[str, Any]) -> tuple[Any, str | None, str | None]:
    def field(name: str) -> str | None:
        return None if name == "none" else _text(row.get(name))

    if spec.image_field:
        image = row.get(spec.image_field)
    else:
        image = next((row[c] for c in sources_mod.PARQUET_IMAGE_COLUMNS if c in row), None)
    if isinstance(image, dict):  # HuggingFace datasets' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes")
    return image, field(spec.alt_text_field), field(spec.vecap_text_field)


class Preprocess(grain.transforms.Map):
    """One Item -> Example({"image": float32 [S, S, 3], "tokens": int32 [L]}, and extras), or Skipped.

    The extras (ExtraSpec): "views" float32 [V, S, S, 3], "tokens_eda",
    "tokens_mlm", "mlm_labels" int32 [L]; "image" left out when not wanted.
    Each draws from its own stream of seeds.example_rng(source seed, stream,
    epoch, index), like the crop and the caption.
    """

    def __init__(
        self,
        specs: list[SourceSpec],
        image: ImageSpec,
        tokenizer: Tokenizer | HFTokenizer,
        include_ids: bool = False,
        extras: ExtraSpec | None = None,
    ):
        self.specs = specs
        self.image = image
        self.tokenizer = tokenizer
        self.include_ids = include_ids
        self.extras = extras or ExtraSpec()
        # Random access to the ArrayRecord sources' shards (picklable: each worker opens its own).
        self.readers = {s.index: records.RecordReader(list(s.files)) for s in specs if not s.streamed}

    def _fields(self, spec: SourceSpec, item: Item) -> tuple[Any, str | None, str | None] | str:
        if spec.format == sources_mod.ARRAY_RECORD:
            reader = self.readers[spec.index]
            try:
                rec = records.decode_record(reader.raw(item.index))
            except records.RecordFormatError as e:
                # A damaged chunk, or bytes that are not a record: skipped, and the shard named.
                path, local = reader.locate(item.index)
                log.warning("%s: skipping record %d of shard %s: %s", spec.label, local, path, e)
                return "bad_record"
            alt = None if spec.alt_text_field == "none" else getattr(rec, spec.alt_text_field)
            vecap = None if spec.vecap_text_field == "none" else getattr(rec, spec.vecap_text_field)
            return rec.jpeg, alt, vecap
        try:
            if spec.format == sources_mod.WEBDATASET:
                return _webdataset_fields(spec, item.payload)
            return _parquet_fields(spec, item.payload)
        except KeyError:
            return "bad_record"
        except ValueError:
            return "bad_caption"

    def map(self, item: Item | Skipped) -> Example | Skipped:
        if isinstance(item, Skipped):
            return item
        spec = self.specs[item.source]
        fields = self._fields(spec, item)
        if isinstance(fields, str):
            return Skipped(fields, item.source, item.position)
        data, alt, vecap = fields
        choice = captions.choose_caption(
            alt, vecap, vecap_prob=spec.vecap_prob, seed=spec.seed, epoch=item.epoch, index=item.index
        )
        if not choice.text:
            return Skipped("empty_caption", item.source, item.position)
        if not isinstance(data, bytes | bytearray | memoryview):  # None: no image member or cell
            return Skipped("missing_image", item.source, item.position)
        im, ex = self.image, self.extras
        data = bytes(data)
        out: dict[str, np.ndarray] = {}
        try:
            if ex.image:
                rng = seeds.example_rng(spec.seed, seeds.STREAM_CROP, item.epoch, item.index)
                pixels = image_ops.decode_random_crop(
                    data,
                    rng,
                    size=im.image_size,
                    scale=im.crop_scale,
                    ratio=im.crop_ratio,
                    decoder=im.decoder,
                )
                out["image"] = image_ops.normalize(pixels)
            if ex.views is not None:
                rngs = [
                    seeds.example_rng(spec.seed, seeds.STREAM_VIEW, item.epoch, item.index, v)
                    for v in range(ex.views.views)
                ]
                views = augment.decode_views(data, rngs, ex.views)
        except image_ops.ImageDecodeError:
            return Skipped("undecodable_image", item.source, item.position)
        out["tokens"] = tokens = self.tokenizer.encode_padded(choice.text)
        if ex.views is not None:
            out["views"] = views
        if ex.eda_alpha is not None:
            rng = seeds.example_rng(spec.seed, seeds.STREAM_EDA, item.epoch, item.index)
            out["tokens_eda"] = self.tokenizer.encode_padded(
                text_augment.eda(choice.text, rng, alpha=ex.eda_alpha)
            )
        if ex.mlm is not None:
            rng = seeds.example_rng(spec.seed, seeds.STREAM_MLM, item.epoch, item.index)
            masked, labels = text_augment.mask_tokens(tokens, rng, ex.mlm)
            for key, value in (("tokens_mlm", masked), ("mlm_labels", labels)):
                if key in ex.mlm_keys:
                    out[key] = value
        if self.include_ids:
            out["index"] = np.int64(item.index)
            out["epoch"] = np.int64(item.epoch)
            out["source"] = np.int64(item.source)
        return Example(item.source, item.position, out)


def _too_many_bad_message(bad: Mapping[str, int], seen: int, max_bad_fraction: float, window: int) -> str:
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
            element = next(self._parent)
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
                        _too_many_bad_message(counts, seen, ds.max_bad_fraction, ds.bad_window)
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


# --- the ArrayRecord stream: positions -------------------------------------------------------------


class _TagPosition(grain.transforms.MapWithIndex):
    """(i, Item) -> the Item with position base + i: its place in this process's stream."""

    def __init__(self, base: int):
        self.base = base

    def map_with_index(self, index: int, item: Item) -> Item:
        return dataclasses.replace(item, position=self.base + index)


class _NotConsumed(grain.transforms.Filter):
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


# --- worker processes die with the trainer -------------------------------------------------------


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in every grain worker process: exit as soon as the process that started it is gone.

    A trainer killed with SIGKILL (an OOM killer, `kill -9`, a preempted
    container) runs no cleanup, and grain's workers, blocked on a full queue,
    would live on (with the shared-memory resource tracker they keep open).
    A daemon thread polls the parent's pid: when the trainer dies the worker
    is re-parented and exits within a fraction of a second. Polling rather
    than PR_SET_PDEATHSIG: that signal follows the *thread* that started the
    worker (one of grain's pool threads), not the trainer process.
    """
    del worker_index, worker_count
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)  # no cleanup to run: the data it was producing has no reader
            threading.Event().wait(0.2)

    threading.Thread(target=watch, name="veclip-exit-with-parent", daemon=True).start()


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
                    + _too_many_bad_message(
                        self._window_bad, self._window_seen, self.max_bad_fraction, self.bad_window
                    )
                )
            self._window_bad = dict.fromkeys(BAD_REASONS, 0)
            self._window_seen = 0
        return batch

    def bad_counts(self) -> dict[str, int]:
        """Examples skipped so far by this process (since the run began, across restores), by reason."""
        return {r: int(c) for r, c in zip(BAD_REASONS, self._bad.sum(0), strict=True)}

    @property
    def records_read(self) -> int:
        """Examples read so far by this process (used and skipped): the denominator of bad_counts."""
        return int(self._bad.sum() + self._examples.sum())

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


# --- building ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSources:
    """Resolved inputs of a run: the training sources, the tokenizer file, evaluation shards."""

    train_files: list[str]  # every source's files, in order
    tokenizer: str
    is_demo: bool
    eval_files: list[str]  # config.eval.files, or the demo's held-out split on demo data; may be empty
    sources: list[SourceSpec] = dataclasses.field(default_factory=list)


def resolve_sources(config: ml_collections.ConfigDict) -> DataSources:
    """The training sources and tokenizer of `config.data` (and `config.eval.files`).

    Generates the demo data under `data.cache_dir` if neither train files nor
    sources are given, or the tokenizer is "". Every training file is checked.
    """
    d = config.data
    has_data = bool(d.train_files) or bool(d.get("sources"))
    demo_data = None
    if not has_data or not d.tokenizer:
        from veclip_jax.data import demo  # not needed (nor its PIL drawing) for real data

        demo_data = demo.ensure_demo_data(d.cache_dir)
    specs = sources_mod.resolve_source_specs(config, None if has_data else list(demo_data.train_files))
    if d.tokenizer:
        tok = os.path.expanduser(d.tokenizer)
        if not os.path.isfile(tok) and not is_hf_tokenizer_dir(tok):
            raise FileNotFoundError(
                f"data.tokenizer is neither a sentencepiece model nor a HF tokenizer directory: {tok}"
            )
    elif has_data:  # validate_config refuses this before any work; this guards direct callers
        raise ValueError(
            "config.data.tokenizer is empty: real data (data.train_files, data.sources) needs its tokenizer"
        )
    else:
        tok = demo_data.tokenizer
    eval_spec = config.eval.files if "eval" in config else ""
    if eval_spec:
        eval_files = records.shard_paths(eval_spec)
    else:
        eval_files = [demo_data.eval_file] if not has_data else []
    return DataSources(
        train_files=[f for s in specs for f in s.files],
        tokenizer=tok,
        is_demo=not has_data,
        eval_files=eval_files,
        sources=specs,
    )


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag; outside absl.app.run (a
    # notebook, pytest, a plain script) flags are unparsed and that raises
    # UnparsedFlagAccessError in the worker. Marking them parsed keeps the
    # defaults and is what absl.app.run would have done.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_data_config(d: Any) -> None:
    if d.decoder not in image_ops.DECODERS:
        raise ValueError(f"data.decoder must be one of {image_ops.DECODERS}, got {d.decoder!r}")
    if d.decoder == "simplejpeg" and not image_ops.has_simplejpeg():
        log.warning("simplejpeg is not installed: decoding with PIL (slower)")
    if d.bad_window < 1:
        raise ValueError(f"data.bad_window must be >= 1, got {d.bad_window}")
    # Checked here rather than failing inside a worker on the first example.
    if not 0.0 <= d.vecap_prob <= 1.0:
        raise ValueError(f"data.vecap_prob must be in [0, 1], got {d.vecap_prob}")
    for name in ("crop_scale", "crop_ratio"):
        lo, hi = getattr(d, name)
        if not 0 < lo <= hi:
            raise ValueError(f"data.{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")


def _wanted_extras(config: ml_collections.ConfigDict, extras: tuple[str, ...] | None) -> tuple[str, ...]:
    """`extras` checked, or (None) the objective's: objectives.batch_keys_for(config.objective.name)."""
    if extras is None:
        from veclip_jax.objectives import batch_keys_for  # jax: the main process only

        extras = tuple(batch_keys_for(config.objective.name if "objective" in config else "clip"))
    extras = tuple(extras)
    unknown = sorted(set(extras) - set(EXTRAS) - {"image", "tokens"})
    if unknown:
        raise ValueError(f"extras {unknown} are not inputs the pipeline makes: it makes {', '.join(EXTRAS)}")
    if "no_image" in extras and "image" in extras:
        raise ValueError('extras ask for both "image" and "no_image"')
    return extras


def _mask_spec(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer | HFTokenizer
) -> text_augment.MaskSpec:
    """The masking of "tokens_mlm", with model.text.mask_id (-1: tokenizer.vocab_size) checked."""
    text = config.model.text
    mask_id = int(text.mask_id) if text.mask_id >= 0 else tokenizer.vocab_size
    if not 0 <= mask_id < text.vocab_size:
        what = f"{text.mask_id}" if text.mask_id >= 0 else f"-1, i.e. {mask_id}, the id past the tokenizer's"
        raise ValueError(
            f"model.text.mask_id={what} is not below model.text.vocab_size={text.vocab_size}: the masked "
            "captions (tokens_mlm) would index past the text embedding table. Raise model.text.vocab_size "
            "or set model.text.mask_id to an id the tokenizer does not use"
        )
    hf_special: list[int] = []
    unk = getattr(tokenizer, "unk_id", None)
    if isinstance(tokenizer, HFTokenizer):
        hf_special = [int(i) for i in tokenizer.hf.all_special_ids]
        unk = tokenizer.hf.unk_token_id
    special = text_augment.special_ids(tokenizer.pad_id, tokenizer.eos_id, hf_special)
    not_random = tuple(sorted({*special, mask_id, *([int(unk)] if unk is not None else [])}))
    return text_augment.MaskSpec(
        prob=float(config.data.augment.mlm_prob),
        mask_id=mask_id,
        vocab_size=tokenizer.vocab_size,
        special=special,
        not_random=not_random,
    )


def _extra_spec(
    config: ml_collections.ConfigDict, extras: tuple[str, ...], tokenizer: Tokenizer | HFTokenizer
) -> ExtraSpec:
    """The ExtraSpec of `extras`, from config.data.augment (read only for the extras asked for)."""
    d = config.data
    a = d.get("augment")
    views = None
    if "views" in extras:
        views = augment.ViewSpec(
            size=int(config.model.vision.image_size),
            views=int(a.views),
            crop_scale=tuple(float(x) for x in a.view_crop_scale),
            crop_ratio=tuple(float(x) for x in d.crop_ratio),
            color_jitter=tuple(float(x) for x in a.color_jitter),
            color_jitter_prob=float(a.color_jitter_prob),
            grayscale_prob=float(a.grayscale_prob),
            blur_prob=float(a.blur_prob),
            blur_sigma=tuple(float(x) for x in a.blur_sigma),
            flip_prob=float(a.flip_prob),
            decoder=d.decoder,
        )
    eda_alpha = None
    if "tokens_eda" in extras:
        if not 0.0 <= a.eda_alpha <= 1.0:
            raise ValueError(f"data.augment.eda_alpha must lie in [0, 1], got {a.eda_alpha}")
        text_augment.load_wordnet()  # fails now, naming the package, rather than in a worker
        eda_alpha = float(a.eda_alpha)
    mlm_keys = tuple(k for k in ("tokens_mlm", "mlm_labels") if k in extras)
    return ExtraSpec(
        image="no_image" not in extras,
        views=views,
        eda_alpha=eda_alpha,
        mlm=_mask_spec(config, tokenizer) if mlm_keys else None,
        mlm_keys=mlm_keys,
    )


class _LanesIterDataset(grain.IterDataset):
    """This process's reader lanes of a streamed mixture, each in its own thread.

    grain's mp_prefetch gives each worker process a slice (`set_slice`): worker
    w of k runs lanes w, w + k, ...; without workers this process runs them
    all. A lane is a sequential pipeline (files -> shuffle window -> mix ->
    preprocess), so its output does not depend on thread timing; the lanes
    are read round-robin (grain's InterleaveIterDataset, one thread each).
    """

    def __init__(self, make_lane: Callable[[int], grain.IterDataset], lanes: int, buffer: int):
        super().__init__()
        self._make_lane, self._lanes, self._buffer = make_lane, range(lanes), buffer

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice
        self._lanes = self._lanes[sl]

    def __iter__(self) -> grain.DatasetIterator:
        lanes = [self._make_lane(lane) for lane in self._lanes]
        return grain.experimental.InterleaveIterDataset(
            lanes, cycle_length=len(lanes), iter_buffer_size=self._buffer
        ).__iter__()

    def __str__(self) -> str:
        return f"_LanesIterDataset(lanes={list(self._lanes)})"


@dataclasses.dataclass(frozen=True)
class _MakeLane:
    """Builds reader lane `lane` of process `process_index` (a picklable callable)."""

    specs: list[SourceSpec]
    preprocess: Preprocess
    process_index: int
    process_count: int
    lanes: int
    shuffle_buffer: int

    def __call__(self, lane: int) -> grain.IterDataset:
        stride = self.process_count * self.lanes
        offset = self.process_index + self.process_count * lane
        streams = {
            s.name or "train": sources_mod.lane_stream(
                s,
                offset=offset,
                stride=stride,
                shuffle_buffer=self.shuffle_buffer,
                lane_seed=seeds.example_seed(s.seed, seeds.STREAM_WINDOW, offset) % 2**32,
            )
            for s in self.specs
        }
        if len(streams) == 1:
            (ds,) = streams.values()
        else:
            ds = grain.IterDataset.mix(streams, {s.name: s.weight for s in self.specs})
        return ds.map(self.preprocess)


def make_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    include_ids: bool = False,
    sources: DataSources | None = None,
    tokenizer: Tokenizer | HFTokenizer | None = None,
    extras: tuple[str, ...] | None = None,
) -> TrainIterator:
    """This process's infinite stream of training batches.

    Yields {"image": float32 [b, S, S, 3] (CLIP-normalised), "tokens": int32
    [b, L]} with b = batch_size // process_count, S = model.vision.image_size,
    L = model.text.context_length, and the `extras` (EXTRAS; None: what
    config.objective needs, `objectives.batch_keys_for(config.objective.name)`):
    "views" float32 [b, V, S, S, 3] (V = data.augment.views MoCo v2 views of
    the image, data/augment.py), "tokens_eda" int32 [b, L] (the caption after
    one EDA operation), "tokens_mlm" and "mlm_labels" int32 [b, L] (the
    caption's tokens BERT-masked with model.text.mask_id, and the original
    ids where selected, -1 elsewhere; data/text_augment.py); "no_image" drops
    "image". None for process_index/process_count means
    jax.process_index()/jax.process_count(). With neither data.train_files nor
    data.sources it reads the demo data (generated under data.cache_dir on
    first use). `include_ids` adds int64 "index", "epoch" and "source" per
    example (see data/sources.py), for audits and tests. Skipped-example
    counts: `iterator.bad_counts()`, `iterator.counters()`. `sources` and
    `tokenizer`, when the caller has them already, are not resolved again.
    """
    if process_index is None or process_count is None:
        import jax  # only here: worker processes unpickle this module without needing jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {process_count} processes")
    batch_size = config.batch_size // process_count
    d = config.data
    _check_data_config(d)

    src = sources or resolve_sources(config)
    specs = src.sources or sources_mod.resolve_source_specs(config, src.train_files)
    text = config.model.text
    if tokenizer is None:
        tokenizer = load_tokenizer(src.tokenizer, text.context_length, pad_id=text.pad_id, eos_id=text.eos_id)
    if tokenizer.vocab_size > text.vocab_size:
        raise ValueError(
            f"tokenizer {src.tokenizer} has {tokenizer.vocab_size} ids but model.text.vocab_size is "
            f"{text.vocab_size}: token ids would fall outside the embedding table"
        )
    wanted = _wanted_extras(config, extras)
    extra_spec = _extra_spec(config, wanted, tokenizer)
    streamed = any(s.streamed for s in specs)
    total = sum(s.num_records for s in specs)
    if not streamed and total < process_count:
        raise ValueError(f"{total} records cannot be split over {process_count} processes")
    image = ImageSpec(
        image_size=int(config.model.vision.image_size),
        crop_scale=tuple(float(x) for x in d.crop_scale),
        crop_ratio=tuple(float(x) for x in d.crop_ratio),
        decoder=d.decoder,
    )
    preprocess = Preprocess(specs, image, tokenizer, include_ids, extra_spec)
    num_workers, num_threads = int(d.num_workers), int(d.num_threads)
    prefetch = max(1, int(d.prefetch))
    batcher = dict(
        num_sources=len(specs),
        positions=not streamed,
        max_bad_fraction=float(d.max_bad_fraction),
        bad_window=int(d.bad_window),
        # "A batch that cannot be filled within a whole epoch fails": an epoch of the
        # ArrayRecord sources, or (streams: no count known) a hundred windows.
        give_up_after=total if not streamed else max(total, 100 * int(d.bad_window)),
    )
    log.info(
        "input: %s; process %d of %d, batch %d; %d worker processes x %d threads, %s; extras: %s",
        "; ".join(
            f"{s.label}: {s.num_records or len(s.files)} {s.format} {'files' if s.streamed else 'records'}"
            f"{' (demo data)' if src.is_demo else ''}, weight {s.weight:g}"
            for s in specs
        ),
        process_index,
        process_count,
        batch_size,
        num_workers,
        num_threads,
        d.decoder,
        ", ".join(wanted) or "none",
    )

    def finish(ds: grain.IterDataset) -> grain.DatasetIterator:
        ds = SkipBadAndBatchIterDataset(ds, batch_size, **batcher)
        if num_workers > 0:
            _ensure_absl_flags_parsed()
            # data.prefetch is the total number of batches ready ahead, over all workers.
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=num_workers, per_worker_buffer_size=max(1, math.ceil(prefetch / num_workers))
                ),
                worker_init_fn=_exit_with_parent,
            )
        else:
            ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
        return iter(ds)

    def build_positional(start: dict[str, Any] | None) -> grain.DatasetIterator:
        base = (start or {}).get("base", 0)
        skip = (start or {}).get("skip", frozenset())
        streams = [sources_mod.epoch_stream(s.index, s.num_records, s.seed) for s in specs]
        mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [s.weight for s in specs])
        ds = mixed[process_index::process_count][base:].map_with_index(_TagPosition(base))
        if skip:
            ds = ds.filter(_NotConsumed(skip))
        ds = ds.map(preprocess)
        # Examples decoded ahead of the batcher: enough to keep every thread busy.
        read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(16, 4 * num_threads))
        return finish(ds.to_iter_dataset(read))

    lanes = max(1, num_workers) * num_threads

    def build_streamed(start: dict[str, Any] | None) -> grain.DatasetIterator:
        del start  # streamed pipelines restore grain's own state
        make_lane = _MakeLane(specs, preprocess, process_index, process_count, lanes, int(d.shuffle_buffer))
        # Each lane decodes up to 16 examples ahead, as the ArrayRecord path's reader threads do.
        return finish(_LanesIterDataset(make_lane, lanes, buffer=16))

    return TrainIterator(
        build_streamed if streamed else build_positional,
        specs=specs,
        positional=not streamed,
        layout={"num_workers": num_workers, "num_threads": num_threads, "process_count": process_count},
        max_bad_fraction=float(d.max_bad_fraction),
        bad_window=int(d.bad_window),
        process_index=process_index,
    )


def epoch_order(seed: int, num_records: int, epoch: int) -> np.ndarray:
    """Record indices in the order the whole job visits them in `epoch` (config.seed = `seed`).

    For data.train_files (one unnamed source); a named source's order is that of
    `sources.source_seed(seed, name)`. Process p of P reads positions p, p+P,
    p+2P, ... of the concatenated epoch orders. Useful to audit which records a
    run has seen.
    """
    ds = grain.MapDataset.range(num_records).shuffle(seed=sources_mod.shuffle_seed(seed)).repeat(None)
    start = epoch * num_records
    return np.fromiter((ds[start + i] for i in range(num_records)), np.int64, num_records)
