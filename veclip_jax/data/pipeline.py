"""The training input pipeline: ArrayRecord shards -> per-process batches, with grain.

    shards ─ MapDataset.source (all shards, one index space, N records)
      → remember each element's record index
      → shuffle (grain's index_shuffle; epoch e uses seed base(config.seed) + e)
      → repeat forever; remember each element's epoch (stream position // N)
      → this process's slice: stream positions p, p+P, p+2P, ...
      → per example (threads; ReadOptions): parse the record, choose the caption
        (VeCLIP mixing), decode + RandomResizedCrop + normalise, tokenise
      → skip bad records and batch (per-process batch b = batch_size / P),
        counting skips per batch
      → worker processes (mp_prefetch) or a prefetch thread
      → TrainIterator: drops the per-batch counts into running totals and
        enforces data.max_bad_fraction

Everything random is a function of (config.seed, epoch, record index): the
shuffle of an epoch, and each example's crop and caption. A batch therefore
depends only on the config and its position in the stream (data.num_workers
decides which examples share a batch, not what they look like), and the iterator's
state (`get_state`/`set_state`, or orbax's grain.checkpoint.CheckpointSave)
resumes exactly: same batches, crops and captions.

The P process slices of the stream are disjoint and together cover every
epoch exactly once (when P divides N an epoch ends on the same step in all
processes; otherwise a process's epoch boundary shifts by at most one record).

Bad records (see BAD_REASONS) are skipped, never silently: each batch carries
the number of records skipped while filling it (field "bad_counts", int32
[len(BAD_REASONS)]); that small array travels with the batch out of the worker
processes, and TrainIterator removes it, keeps running totals (part of its
checkpointed state) and exposes them as `iterator.bad_counts()`. More than
`data.max_bad_fraction` of a window of `data.bad_window` records raises
TooManyBadRecordsError.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset

from veclip_jax.data import captions, image_ops, records, seeds
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer, is_hf_tokenizer_dir, load_tokenizer

if TYPE_CHECKING:  # not imported at run time: worker processes unpickle this module
    import ml_collections

# Why a record was skipped. "bad_record": the bytes are not a record (corrupt
# shard, wrong format version); "empty_caption": both captions are missing or
# empty after cleaning (checked first, as it is cheaper); "undecodable_image":
# no decoder reads the image bytes.
BAD_REASONS = ("bad_record", "empty_caption", "undecodable_image")

log = logging.getLogger(__name__)


class TooManyBadRecordsError(RuntimeError):
    """More than data.max_bad_fraction of a window of records was skipped."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a record that could not be used; the batcher counts it."""

    reason: str


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """What the per-example work needs from the config (plain values: it is pickled to workers)."""

    seed: int
    image_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    decoder: str
    vecap_prob: float
    include_ids: bool = False


class _TagRecordIndex(grain.transforms.MapWithIndex):
    """(index, raw) -> (record index, raw). Applied before the shuffle, so index is the record's."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def map_with_index(self, index: int, element: bytes) -> tuple[int, bytes]:
        # The shuffle asks for its parent's items at epoch * N + i; the source
        # wraps around, and so must the tag.
        return index % self.num_records, element


class _TagEpoch(grain.transforms.MapWithIndex):
    """(position, (record index, raw)) -> (epoch, record index, raw). Applied after repeat."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def map_with_index(self, position: int, element: tuple[int, bytes]) -> tuple[int, int, bytes]:
        index, raw = element
        return position // self.num_records, index, raw


class Preprocess(grain.transforms.Map):
    """One record visit -> {"image": float32 [S, S, 3], "tokens": int32 [L]}, or Skipped."""

    def __init__(self, spec: ExampleSpec, tokenizer: Tokenizer | HFTokenizer):
        self.spec = spec
        self.tokenizer = tokenizer

    def map(self, element: tuple[int, int, bytes]) -> dict[str, np.ndarray] | Skipped:
        epoch, index, raw = element
        s = self.spec
        try:
            rec = records.decode_record(raw)
        except records.RecordFormatError:
            return Skipped("bad_record")
        choice = captions.choose_caption(
            rec.alt_text, rec.vecap_text, vecap_prob=s.vecap_prob, seed=s.seed, epoch=epoch, index=index
        )
        if not choice.text:
            return Skipped("empty_caption")
        rng = seeds.example_rng(s.seed, seeds.STREAM_CROP, epoch, index)
        try:
            image = image_ops.decode_random_crop(
                rec.jpeg, rng, size=s.image_size, scale=s.crop_scale, ratio=s.crop_ratio, decoder=s.decoder
            )
        except image_ops.ImageDecodeError:
            return Skipped("undecodable_image")
        out = {"image": image_ops.normalize(image), "tokens": self.tokenizer.encode_padded(choice.text)}
        if s.include_ids:
            out["index"] = np.int64(index)
            out["epoch"] = np.int64(epoch)
        return out


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
    is the one piece of machinery grain does not provide. Each batch gets a
    "bad_counts" int32 [len(BAD_REASONS)] field: the skips met while filling it.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        *,
        max_bad_fraction: float,
        bad_window: int,
        give_up_after: int,
    ):
        super().__init__(parent)
        self.batch_size = batch_size
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
        self._reason_index = {r: i for i, r in enumerate(BAD_REASONS)}

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        good: list[dict[str, np.ndarray]] = []
        bad = np.zeros(len(BAD_REASONS), np.int32)
        n_bad = 0
        while len(good) < ds.batch_size:
            element = next(self._parent)
            if isinstance(element, Skipped):
                bad[self._reason_index[element.reason]] += 1
                n_bad += 1
                # The main process checks windows from the counts, but only
                # once a batch arrives: a stream of nothing but bad records
                # would never deliver one. Fail here instead.
                seen = n_bad + len(good)
                if (
                    n_bad >= ds.bad_window and n_bad / seen > ds.max_bad_fraction
                ) or n_bad > ds.give_up_after:
                    counts = dict(zip(BAD_REASONS, bad.tolist(), strict=True))
                    raise TooManyBadRecordsError(
                        _too_many_bad_message(counts, seen, ds.max_bad_fraction, ds.bad_window)
                    )
                continue
            good.append(element)
        batch = {k: np.stack([e[k] for e in good]) for k in good[0]}
        batch["bad_counts"] = bad
        return batch

    def get_state(self) -> dict[str, Any]:
        # A batch is complete when returned, so the parent's position is all
        # the state there is (as in grain's own batch).
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return f"SkipBadAndBatchIterator(batch_size={self._ds.batch_size})"


class TrainIterator(grain.DatasetIterator):
    """The training iterator: batches {"image", "tokens"} (plus ids if asked for).

    A grain DatasetIterator, so `get_state`/`set_state` and orbax's
    `grain.checkpoint.CheckpointSave/CheckpointRestore` work on it. Its state
    also holds the skipped-record totals and the current window, so counts and
    the max_bad_fraction check continue across a restore.

    `bad_counts()` returns {reason: records skipped so far} for logging.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        *,
        max_bad_fraction: float,
        bad_window: int,
        process_index: int,
    ):
        super().__init__(parent)
        self.max_bad_fraction = max_bad_fraction
        self.bad_window = bad_window
        self.process_index = process_index
        self._totals = dict.fromkeys(BAD_REASONS, 0)
        self._window_bad = dict.fromkeys(BAD_REASONS, 0)
        self._window_seen = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        counts = batch.pop("bad_counts")
        n_good = len(batch["tokens"])
        n_bad = int(counts.sum())
        self._window_seen += n_good + n_bad
        for reason, c in zip(BAD_REASONS, counts.tolist(), strict=True):
            self._totals[reason] += c
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
        """Records skipped so far by this process (since the run began, across restores), by reason."""
        return dict(self._totals)

    def get_state(self) -> dict[str, Any]:
        return {
            "pipeline": self._parent.get_state(),
            "bad_counts": dict(self._totals),
            "window": {"seen": self._window_seen, "bad": dict(self._window_bad)},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._totals = {r: int(state["bad_counts"].get(r, 0)) for r in BAD_REASONS}
        self._window_seen = int(state["window"]["seen"])
        self._window_bad = {r: int(state["window"]["bad"].get(r, 0)) for r in BAD_REASONS}

    def __str__(self) -> str:
        return f"TrainIterator(process_index={self.process_index})"


@dataclasses.dataclass(frozen=True)
class DataSources:
    """Resolved inputs of a run: shard paths, the tokenizer file, evaluation shards."""

    train_files: list[str]
    tokenizer: str
    is_demo: bool
    eval_files: list[str]  # config.eval.files, or the demo's held-out split on demo data; may be empty


def resolve_sources(config: ml_collections.ConfigDict) -> DataSources:
    """The shard paths and tokenizer of `config.data` (and `config.eval.files`).

    Generates the demo data under `data.cache_dir` if train files or tokenizer are "".
    """
    d = config.data
    demo_data = None
    if not d.train_files or not d.tokenizer:
        from veclip_jax.data import demo  # not needed (nor its PIL drawing) for real data

        demo_data = demo.ensure_demo_data(d.cache_dir)
    if d.train_files:
        files = records.shard_paths(d.train_files)
    else:
        files = list(demo_data.train_files)
    if d.tokenizer:
        tok = os.path.expanduser(d.tokenizer)
        if not os.path.isfile(tok) and not is_hf_tokenizer_dir(tok):
            raise FileNotFoundError(
                f"data.tokenizer is neither a sentencepiece model nor a HF tokenizer directory: {tok}"
            )
    elif d.train_files:  # validate_config refuses this before any work; this guards direct callers
        raise ValueError("config.data.tokenizer is empty: real data (data.train_files) needs its tokenizer")
    else:
        tok = demo_data.tokenizer
    eval_spec = config.eval.files if "eval" in config else ""
    if eval_spec:
        eval_files = records.shard_paths(eval_spec)
    else:
        eval_files = [demo_data.eval_file] if not d.train_files else []
    return DataSources(train_files=files, tokenizer=tok, is_demo=not d.train_files, eval_files=eval_files)


def _shuffle_seed(seed: int) -> int:
    # Hashed, not config.seed itself: grain reshuffles epoch e with seed + e,
    # so raw seeds 0 and 1 would share all epochs but the first.
    return seeds.example_seed(seed, seeds.STREAM_SHUFFLE) % 2**32


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag; outside absl.app.run (a
    # notebook, pytest, a plain script) flags are unparsed and that raises
    # UnparsedFlagAccessError in the worker. Marking them parsed keeps the
    # defaults and is what absl.app.run would have done.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_dataset(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    include_ids: bool = False,
    sources: DataSources | None = None,
    tokenizer: Tokenizer | HFTokenizer | None = None,
) -> grain.IterDataset:
    """The pipeline as a grain IterDataset yielding batches with a "bad_counts" field.

    Most callers want `make_train_iterator`, which wraps this and removes the
    counts. `include_ids` adds int64 "index" (record index over all shards)
    and "epoch" per example, for debugging and tests. `sources` and
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

    src = sources or resolve_sources(config)
    text = config.model.text
    if tokenizer is None:
        tokenizer = load_tokenizer(src.tokenizer, text.context_length, pad_id=text.pad_id, eos_id=text.eos_id)
    if tokenizer.vocab_size > text.vocab_size:
        raise ValueError(
            f"tokenizer {src.tokenizer} has {tokenizer.vocab_size} ids but model.text.vocab_size is "
            f"{text.vocab_size}: token ids would fall outside the embedding table"
        )
    source = grain.sources.ArrayRecordDataSource(src.train_files)
    n = len(source)
    if n == 0:
        raise ValueError(f"the data shards hold no records: {src.train_files}")
    if n < process_count:
        raise ValueError(f"{n} records cannot be split over {process_count} processes")

    spec = ExampleSpec(
        seed=int(config.seed),
        image_size=int(config.model.vision.image_size),
        crop_scale=tuple(float(x) for x in d.crop_scale),
        crop_ratio=tuple(float(x) for x in d.crop_ratio),
        decoder=d.decoder,
        vecap_prob=float(d.vecap_prob),
        include_ids=include_ids,
    )
    ds = (
        grain.MapDataset.source(source)
        .map_with_index(_TagRecordIndex(n))
        .shuffle(seed=_shuffle_seed(spec.seed))
        .repeat(None)
        .map_with_index(_TagEpoch(n))
    )
    ds = ds[process_index::process_count]
    ds = ds.map(Preprocess(spec, tokenizer))
    num_threads = int(d.num_threads)
    # Examples decoded ahead of the batcher: enough to keep every thread busy.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(16, 4 * num_threads))
    it_ds = SkipBadAndBatchIterDataset(
        ds.to_iter_dataset(read),
        batch_size,
        max_bad_fraction=float(d.max_bad_fraction),
        bad_window=int(d.bad_window),
        give_up_after=n,
    )
    num_workers, prefetch = int(d.num_workers), max(1, int(d.prefetch))
    log.info(
        "input: %d records in %d shards%s; process %d of %d, batch %d; %d worker processes x %d threads, %s",
        n,
        len(src.train_files),
        " (demo data)" if src.is_demo else "",
        process_index,
        process_count,
        batch_size,
        num_workers,
        num_threads,
        d.decoder,
    )
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        # data.prefetch is the total number of batches ready ahead, over all workers.
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=max(1, math.ceil(prefetch / num_workers))
            )
        )
    else:
        it_ds = ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
    return it_ds


def make_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    include_ids: bool = False,
    sources: DataSources | None = None,
    tokenizer: Tokenizer | HFTokenizer | None = None,
) -> TrainIterator:
    """This process's infinite stream of training batches.

    Yields {"image": float32 [b, S, S, 3] (CLIP-normalised), "tokens": int32
    [b, L]} with b = batch_size // process_count, S = model.vision.image_size,
    L = model.text.context_length. None for process_index/process_count means
    jax.process_index()/jax.process_count(). With data.train_files == "" it
    reads the demo data (generated under data.cache_dir on first use).
    Skipped-record counts: `iterator.bad_counts()`. `sources` and `tokenizer`:
    as in `make_train_dataset`.
    """
    if process_index is None:
        import jax

        process_index = jax.process_index()
    ds = make_train_dataset(
        config,
        process_index=process_index,
        process_count=process_count,
        include_ids=include_ids,
        sources=sources,
        tokenizer=tokenizer,
    )
    return TrainIterator(
        iter(ds),
        max_bad_fraction=float(config.data.max_bad_fraction),
        bad_window=int(config.data.bad_window),
        process_index=process_index,
    )


def epoch_order(seed: int, num_records: int, epoch: int) -> np.ndarray:
    """Record indices in the order the whole job visits them in `epoch` (config.seed = `seed`).

    Process p of P reads positions p, p+P, p+2P, ... of the concatenated epoch
    orders. Useful to audit which records a run has seen.
    """
    ds = grain.MapDataset.range(num_records).shuffle(seed=_shuffle_seed(seed)).repeat(None)
    start = epoch * num_records
    return np.fromiter((ds[start + i] for i in range(num_records)), np.int64, num_records)
