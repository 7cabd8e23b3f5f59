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
        RandomResizedCrop (uint8), tokenise; and the batch keys the caller
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

Bad examples are skipped and counted, never silently (data/skips.py,
data/skip_and_batch.py); more than `data.max_bad_fraction` of a window of
`data.bad_window` examples (all sources together) raises TooManyBadRecordsError.

This module assembles the stages, each in its own module:

    preprocess.py       Item -> Example of the batch keys asked for, or Skipped
    skip_and_batch.py   skip bad examples and batch, counting per source and reason
    workers.py          worker processes (mp_prefetch) or a prefetch thread; their lifetime
    train_iterator.py   TrainIterator: the iterator and its checkpointed state
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

from veclip_jax import batch
from veclip_jax.data import bpe, image_ops, lane_streams, records, seeds
from veclip_jax.data import sources as sources_mod
from veclip_jax.data.preprocess import Preprocess, extra_spec, image_spec
from veclip_jax.data.skip_and_batch import SkipBadAndBatchIterDataset
from veclip_jax.data.sources import SourceSpec
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer, is_hf_tokenizer_dir, load_tokenizer
from veclip_jax.data.train_iterator import NotConsumed, TagPosition, TrainIterator
from veclip_jax.data.workers import prefetch

if TYPE_CHECKING:  # not imported at run time: worker processes unpickle this module
    import ml_collections

log = logging.getLogger(__name__)


def _wanted_keys(keys: Iterable[str]) -> tuple[str, ...]:
    try:
        return batch.check_keys(keys)
    except ValueError as e:
        raise ValueError(f"make_train_iterator(keys=...): {e}; not inputs the pipeline makes") from None


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
        # "clip_bpe" becomes open_clip's vocabulary file: the file a run keeps (veclip_jax/data/bpe.py)
        tok = bpe.resolve(d.tokenizer) if bpe.is_clip_bpe(d.tokenizer) else os.path.expanduser(d.tokenizer)
        if not os.path.isfile(tok) and not is_hf_tokenizer_dir(tok):
            raise FileNotFoundError(
                f"data.tokenizer is neither a sentencepiece model, a HF tokenizer directory nor "
                f"\"{bpe.NAME}\" (or a copy of its {bpe.VOCAB_FILE}): {tok}"
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
            s.name or "train": lane_streams.lane_stream(
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
    keys: Iterable[str] = batch.DEFAULT_KEYS,
) -> TrainIterator:
    """This process's infinite stream of training batches, holding exactly the batch keys `keys`.

    `keys`: the keys to make (veclip_jax/batch.py FIELDS; the trainer passes
    its objective's inputs), each [b, ...] with b = batch_size //
    process_count: "image" uint8 [b, S, S, 3] (the RandomResizedCrop's pixels,
    normalised by the model in its jitted step; absent from `keys`: no crop is
    made), "tokens" int32 [b, L], "views" uint8 [b, V, S, S, 3] (V = data.augment.views MoCo v2
    views, data/augment.py), "tokens_eda" int32 [b, L] (the caption after one
    EDA operation), "tokens_mlm" and "mlm_labels" int32 [b, L] (the caption's
    tokens BERT-masked with model.text.mask_id, and the original ids where
    selected, -1 elsewhere; data/text_augment.py). None for
    process_index/process_count means jax.process_index()/jax.process_count().
    With neither data.train_files nor data.sources it reads the demo data
    (generated under data.cache_dir on first use). `include_ids` adds int64
    "index", "epoch" and "source" per example (see data/sources.py), for
    audits and tests. Skipped-example counts: `iterator.bad_counts()`,
    `iterator.counters()`. `sources` and `tokenizer`, when the caller has them
    already, are not resolved again. The config is validated by the caller
    (config.validate_config); what only data can tell (the tokenizer against
    the vocabulary, the mask id) is checked here.
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
    wanted = _wanted_keys(keys)
    if d.decoder == "simplejpeg" and not image_ops.has_simplejpeg():
        log.warning("simplejpeg is not installed: decoding with PIL (slower)")

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
    extras = extra_spec(config, wanted, tokenizer)
    streamed = any(s.streamed for s in specs)
    total = sum(s.num_records for s in specs)
    if not streamed and total < process_count:
        raise ValueError(f"{total} records cannot be split over {process_count} processes")
    preprocess = Preprocess(specs, image_spec(config), tokenizer, include_ids, extras)
    num_workers, num_threads = int(d.num_workers), int(d.num_threads)
    prefetch_batches = max(1, int(d.prefetch))
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
        "input: %s; process %d of %d, batch %d; %d worker processes x %d threads, %s; keys: %s",
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
        ", ".join(wanted),
    )

    def finish(ds: grain.IterDataset) -> grain.DatasetIterator:
        ds = SkipBadAndBatchIterDataset(ds, batch_size, **batcher)
        return prefetch(ds, num_workers=num_workers, prefetch=prefetch_batches)

    def build_positional(start: dict[str, Any] | None) -> grain.DatasetIterator:
        base = (start or {}).get("base", 0)
        skip = (start or {}).get("skip", frozenset())
        streams = [sources_mod.epoch_stream(s.index, s.num_records, s.seed) for s in specs]
        mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [s.weight for s in specs])
        ds = mixed[process_index::process_count][base:].map_with_index(TagPosition(base))
        if skip:
            ds = ds.filter(NotConsumed(skip))
        ds = ds.map(preprocess)
        # Examples decoded ahead of the batcher: enough to keep every thread busy. A worker process
        # with one reader thread maps in its own loop instead: a thread there would only hand each
        # example over (0.06-0.1 ms of CPU a record, bench.input on the demo data; and 20 % more
        # records/s). In-process, the thread is what overlaps decoding with the training step.
        if num_workers > 0 and num_threads == 1:
            read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        else:
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
