"""Converting raw image-text pairs into ArrayRecord training shards (format v1, records.py).

Inputs:

* img2dataset's webdataset output: tars whose samples are KEY.jpg (or .jpeg,
  .png, .webp), KEY.txt (the AltText) and KEY.json (url, status, caption).
  VeCLIP's released VeCap captions, JSON files {image_url: caption}, are
  joined by URL into `vecap_text`.
* A CSV/TSV table: an image path, the captions, optionally a key and a URL
  per row; images are read from disk.

The readers of these inputs are in data/readers/ (webdataset, vecap_json,
table), input lists are path specs (data/paths.py); this module turns what
they read into records and shards.

Sharding rule. Output shard j of N is made of the webdataset input tars i
with i % N == j (whole tars, in order; samples in tar order), or of the table
rows r with r % N == j. A shard is therefore a function of its own inputs
only: one worker writes it alone without reading what another worker reads,
and re-making it after a crash or a deletion gives the same records.

Resume. A shard is done when its file exists (RecordWriter renames it into
place only on a clean close) and so does its stats file, written right after,
recording the inputs and options it was made from. A rerun skips done shards
and rewrites the others (a leftover PATH.tmp is overwritten). A done shard
made from other inputs or options stops the run before anything is written:
mixing two conversions in one directory would silently duplicate or drop pairs.

Bad input never stops a conversion: each skipped sample is counted under the
first check it fails (SKIP_REASONS, in that order). The summary (records per
shard, skips by reason, VeCap join rate) is returned, and written as JSON to
OUT-stats.json next to the shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from veclip_jax import fileio
from veclip_jax.data import captions, records
from veclip_jax.data.image_ops import image_decodes
from veclip_jax.data.paths import expand_paths
from veclip_jax.data.readers.parquet import iter_parquet_rows
from veclip_jax.data.readers.table import Row, TableColumns, read_image_folder, read_table
from veclip_jax.data.readers.vecap_json import VecapLookup, build_vecap_index
from veclip_jax.data.readers.webdataset import IMAGE_EXTENSIONS, iter_tar_samples

log = logging.getLogger(__name__)

# Part of every shard's fingerprint: bump when a change to this module or its readers changes
# which records a shard holds, so that a resume does not mix the two versions.
CONVERTER_VERSION = 1

# Why samples are skipped, in the order they are checked (a sample counts once).
SKIP_REASONS: dict[str, str] = {
    "missing_input": "an input tar that does not exist or cannot be opened (one count per tar)",
    "unreadable_input": "an input tar that is corrupt or truncated; reading it stops there (one per tar)",
    "bad_row": "table: a row that is not UTF-8 or that the csv module cannot parse (file and line logged)",
    "bad_metadata": "the sample's .json is not a JSON object",
    "not_success": "the .json status is present and not 'success' (a failed img2dataset download)",
    "no_image": "no image member (webdataset) or an empty image path (table)",
    "no_caption": "neither an AltText nor a VeCap caption, after cleaning",
    "missing_file": "table: the image file does not exist or cannot be read",
    "duplicate_key": "a key already written to the same shard",
    "unreadable_image": "the image bytes do not decode",
}


# --- checks on one sample -----------------------------------------------------------------------


def _caption(value: Any) -> str | None:
    """The text as it is, or None when it is not a string or cleans to nothing (the loader cleans)."""
    if not isinstance(value, str) or not captions.clean_caption(value):
        return None
    return value


# --- shard jobs ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything one worker needs to write one output shard (pickled to spawned workers)."""

    path: str
    stats_path: str
    fingerprint: dict[str, Any]
    tars: tuple[str, ...] = ()  # webdataset tars, or Parquet files
    rows: tuple[Row, ...] = ()
    columns: TableColumns = TableColumns()  # Parquet
    image_root: str = ""  # Parquet: base of image paths in cells
    vecap_index: str | None = None
    source: str | None = None
    verify_images: bool = True


@dataclasses.dataclass
class _Candidate:
    record: records.Record
    vecap_joined: bool  # vecap_text came from the VeCap JSON


# A candidate record, or the reason it was skipped; with where it came from (a tar or an image file).
_Outcome = tuple[_Candidate | str, str]


def _webdataset_outcomes(job: _Job, lookup: VecapLookup | None) -> Iterator[_Outcome]:
    for tar in job.tars:
        for sample in iter_tar_samples(tar):
            if isinstance(sample, str):
                yield sample, tar
            else:
                yield _webdataset_candidate(*sample, lookup, job.source), tar


def _webdataset_candidate(
    key: str, members: Mapping[str, bytes], lookup: VecapLookup | None, source: str | None
) -> _Candidate | str:
    meta: Any = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:  # also UnicodeDecodeError
            return "bad_metadata"
        if not isinstance(meta, dict):
            return "bad_metadata"
    status = meta.get("status")
    if status is not None and status != "success":
        return "not_success"
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        return "no_image"
    alt = None
    if "txt" in members:
        alt = _caption(members["txt"].decode("utf-8", errors="replace"))
    if alt is None:
        alt = _caption(meta.get("caption"))  # img2dataset writes the caption to both
    url = meta.get("url")
    vecap = _caption(lookup(url)) if lookup is not None and isinstance(url, str) else None
    if alt is None and vecap is None:
        return "no_caption"
    record = records.Record(key=key, jpeg=image, alt_text=alt, vecap_text=vecap, source=source)
    return _Candidate(record, vecap_joined=vecap is not None)


def _parquet_outcomes(job: _Job, lookup: VecapLookup | None) -> Iterator[_Outcome]:
    for path in job.tars:
        for row in iter_parquet_rows(path, job.columns, job.image_root):
            if isinstance(row, str):
                yield row, path
            else:
                yield _table_candidate(row, lookup, job.source), path


def _table_outcomes(job: _Job, lookup: VecapLookup | None) -> Iterator[_Outcome]:
    for row in job.rows:
        yield _table_candidate(row, lookup, job.source), row.image


def _table_candidate(row: Row, lookup: VecapLookup | None, source: str | None) -> _Candidate | str:
    if row.error is not None:
        return "bad_row"
    if not row.image and row.image_bytes is None:
        return "no_image"
    alt, vecap, joined = _caption(row.alt_text), _caption(row.vecap_text), False
    if vecap is None and lookup is not None and row.url:
        vecap = _caption(lookup(row.url))
        joined = vecap is not None
    if alt is None and vecap is None:
        return "no_caption"
    if row.image_bytes is not None:
        image = row.image_bytes
    elif not row.image:
        return "no_image"
    else:
        try:
            with open(row.image, "rb") as f:
                image = f.read()
        except OSError:
            return "missing_file"
    record = records.Record(key=row.key, jpeg=image, alt_text=alt, vecap_text=vecap, source=source)
    return _Candidate(record, vecap_joined=joined)


def _write_shard(job: _Job) -> dict[str, Any]:
    """Writes one output shard, then its stats file; returns the stats. Runs in a worker."""
    t0 = time.perf_counter()
    if os.path.exists(job.stats_path):
        os.remove(job.stats_path)  # the shard is being remade: its old stats no longer hold
    skipped: collections.Counter[str] = collections.Counter()
    missing_inputs: list[str] = []
    unreadable_inputs: list[str] = []
    with_alt = with_vecap = joined = 0
    seen: set[str] = set()
    lookup = VecapLookup(job.vecap_index) if job.vecap_index else None
    outcomes = {"webdataset": _webdataset_outcomes, "parquet": _parquet_outcomes}.get(
        job.fingerprint["kind"], _table_outcomes
    )
    try:
        with records.RecordWriter(job.path) as writer:
            for item, where in outcomes(job, lookup):
                if isinstance(item, str):
                    skipped[item] += 1
                    if item == "missing_input":
                        missing_inputs.append(where)
                    elif item == "unreadable_input":
                        unreadable_inputs.append(where)
                    continue
                record = item.record
                if record.key in seen:
                    skipped["duplicate_key"] += 1
                    continue
                if job.verify_images and not image_decodes(record.jpeg):
                    skipped["unreadable_image"] += 1
                    continue
                seen.add(record.key)
                writer.write(record)
                with_alt += record.alt_text is not None
                with_vecap += record.vecap_text is not None
                joined += item.vecap_joined
            count = writer.count
    finally:
        if lookup is not None:
            lookup.close()
    stats = {
        "shard": os.path.basename(job.path),
        "records": count,
        "with_alt_text": with_alt,
        "with_vecap_text": with_vecap,
        "vecap_joined": joined,
        "skipped": {r: skipped[r] for r in SKIP_REASONS if skipped[r]},
        "missing_inputs": missing_inputs,
        "unreadable_inputs": unreadable_inputs,
        "seconds": round(time.perf_counter() - t0, 3),
        "fingerprint": job.fingerprint,
    }
    np.save(_shard_keys_path(job.stats_path), _key_hashes(sorted(seen)))  # before the stats: the done marker
    fileio.atomic_write_json(job.stats_path, stats, indent=1)  # a stats file is complete or absent
    return stats


# --- the conversion -----------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionSummary:
    """The outcome of a conversion: totals, and per-shard stats (`shards`, in shard order)."""

    out: str
    num_shards: int
    records: int
    with_alt_text: int
    with_vecap_text: int
    vecap_joined: int
    vecap_join_rate: float | None  # vecap_joined / records; None without VeCap JSON
    skipped: dict[str, int]
    written: int  # shards written by this run
    reused: int  # shards found done and skipped
    missing_inputs: list[str]
    unreadable_inputs: list[str]
    seconds: float
    stats_path: str
    shards: list[dict[str, Any]]  # this task's shards (all of them when task == [0, 1])
    task: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  # [index, count] of --task
    duplicate_keys_across_shards: int = 0  # keys in more than one shard (of the shards done so far)
    duplicate_key_shards: list[list[str]] = dataclasses.field(default_factory=list)  # a few shard pairs

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what OUT.stats.json holds)."""
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A human-readable report."""
        lines = [
            f"{self.records:,} records in {self.num_shards} shards {self.out}-*-of-{self.num_shards:05d}"
            f"{records.SHARD_SUFFIX} ({self.written} written now, {self.reused} done before) "
            f"in {self.seconds:.1f} s",
            f"  with AltText {self.with_alt_text:,}, with VeCap {self.with_vecap_text:,}",
        ]
        if self.vecap_join_rate is not None:
            lines.append(
                f"  VeCap joined by URL: {self.vecap_joined:,} of {self.records:,} "
                f"({100 * self.vecap_join_rate:.1f} %)"
            )
        total = sum(self.skipped.values())
        lines.append(f"  skipped {total:,}" + (":" if total else ""))
        for reason, n in self.skipped.items():
            lines.append(f"    {reason:<17} {n:>10,}  {SKIP_REASONS[reason]}")
        for name, paths in (("missing", self.missing_inputs), ("unreadable", self.unreadable_inputs)):
            if paths:
                shown = ", ".join(paths[:5]) + (f", ... ({len(paths)} in all)" if len(paths) > 5 else "")
                lines.append(f"  {name} input tars: {shown}")
        per_shard = [s["records"] for s in self.shards]
        if per_shard:
            lines.append(f"  records per shard: min {min(per_shard):,}, max {max(per_shard):,}")
        if self.duplicate_keys_across_shards:
            shown = ", ".join(" and ".join(p) for p in self.duplicate_key_shards[:3])
            n = self.duplicate_keys_across_shards
            lines.append(f"  keys in more than one shard: {n:,} (e.g. {shown})")
        if self.task != [0, 1]:
            lines.append(f"  task {self.task[0]} of {self.task[1]}: its {len(self.shards)} shards above")
        lines.append(f"  stats: {self.stats_path}")
        return "\n".join(lines)


# Side outputs are named OUT.something, never OUT-something: the shards' own glob (OUT-*) must
# match the shards only, so `--config.data.train_files='DIR/train-*'` reads them and nothing else.


def stats_path(out: str, task: tuple[int, int] = (0, 1)) -> str:
    """A conversion's summary: OUT.stats.json (task i of M: OUT.stats-0000i-of-0000M.json)."""
    return f"{out}.stats.json" if task == (0, 1) else f"{out}.stats-{task[0]:05d}-of-{task[1]:05d}.json"


def _shard_stats_path(out: str, index: int, num_shards: int) -> str:
    return os.path.join(f"{out}.shard-stats", f"{index:05d}-of-{num_shards:05d}.json")


def _shard_keys_path(stats: str) -> str:
    return stats.removesuffix(".json") + ".keys.npy"


def _vecap_index_path(out: str, task: tuple[int, int] = (0, 1)) -> str:
    return f"{out}.vecap-index.sqlite" if task == (0, 1) else f"{out}.vecap-index-{task[0]:05d}.sqlite"


def _load_done(job: _Job) -> dict[str, Any] | None:
    """The stats of a done shard; None if it must be (re)written; raises if made from other inputs."""
    if not (os.path.exists(job.path) and os.path.exists(job.stats_path)):
        return None
    try:
        with open(job.stats_path) as f:
            stats = json.load(f)
    except ValueError:
        return None  # not readable stats: remake the shard
    if stats.get("fingerprint") != job.fingerprint:
        old = stats.get("fingerprint") or {}
        differ = sorted(k for k in set(old) | set(job.fingerprint) if old.get(k) != job.fingerprint.get(k))
        raise ValueError(
            f"{job.path} exists from a conversion with other inputs or options (differs in: "
            f"{', '.join(differ)}). Convert into a new --out, or delete that conversion's shards and "
            f"{os.path.dirname(job.stats_path)}/ first."
        )
    return stats


def _key_hashes(keys: Sequence[str]) -> np.ndarray:
    """Sorted 64-bit hashes of record keys: what a shard leaves behind to find keys repeated across shards."""
    h = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys]
    return np.sort(np.asarray(h, np.uint64))


def _cross_shard_duplicates(jobs: list[_Job]) -> tuple[int, list[list[str]]]:
    """(keys found in more than one shard, up to 10 [shard, shard] pairs holding one) over the shards done."""
    hashes, owner = [], []
    for i, job in enumerate(jobs):
        path = _shard_keys_path(job.stats_path)
        if os.path.exists(path):
            h = np.load(path)
            hashes.append(h)
            owner.append(np.full(len(h), i, np.int64))
    if not hashes:
        return 0, []
    h, o = np.concatenate(hashes), np.concatenate(owner)
    order = np.argsort(h, kind="stable")
    h, o = h[order], o[order]
    repeat = np.flatnonzero(h[1:] == h[:-1])  # within a shard keys are unique: a repeat spans shards
    pairs = []
    for r in repeat[:10]:
        pairs.append([os.path.basename(jobs[o[r]].path), os.path.basename(jobs[o[r + 1]].path)])
    return len(np.unique(h[repeat + 1])) if len(repeat) else 0, pairs


def _convert(
    jobs: list[_Job],
    out: str,
    *,
    vecap_json: list[str],
    workers: int,
    task: tuple[int, int] = (0, 1),
) -> ConversionSummary:
    t0 = time.perf_counter()
    num_shards = len(jobs)
    task_index, num_tasks = task
    os.makedirs(os.path.dirname(_shard_stats_path(out, 0, 1)), exist_ok=True)
    # Task i of M (one per machine) writes the output shards j with j % M == i: shards depend only
    # on their own inputs, so the machines need no coordination beyond a shared output directory.
    mine = [i for i in range(num_shards) if i % num_tasks == task_index]
    done = {i: s for i in mine if (s := _load_done(jobs[i])) is not None}
    pending = [jobs[i] for i in mine if i not in done]
    log.info("%d of %d shards to write (%d done before)", len(pending), len(mine), len(done))
    index_path = _vecap_index_path(out, task)
    if pending and vecap_json:
        build_vecap_index(vecap_json, index_path)
        pending = [dataclasses.replace(job, vecap_index=index_path) for job in pending]

    results: dict[str, dict[str, Any]] = {}

    def finished(stats: dict[str, Any]) -> None:
        results[stats["shard"]] = stats
        log.info(
            "[%d/%d] %s: %d records, %d skipped (%.1f s)",
            len(results),
            len(pending),
            stats["shard"],
            stats["records"],
            sum(stats["skipped"].values()),
            stats["seconds"],
        )

    workers = max(1, min(workers, len(pending)))
    if workers == 1:
        for job in pending:  # in this process: no start-up cost, plain tracebacks
            finished(_write_shard(job))
    else:
        # spawn, not fork: the caller may hold threads (jax, grain) that a fork would copy mid-lock.
        # A process pool from concurrent.futures rather than multiprocessing.Pool: a worker that dies
        # (killed for memory, or unable to start) raises BrokenProcessPool instead of hanging the run.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_write_shard, job) for job in pending]
            try:
                for future in concurrent.futures.as_completed(futures):
                    finished(future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # shards under way finish; no new ones start
                raise
    if os.path.exists(index_path):
        os.remove(index_path)  # every shard of this task is done: the index is only needed to resume

    stats = {i: done.get(i) or results[os.path.basename(jobs[i].path)] for i in mine}
    summary = _summary(jobs, stats, out, vecap_json, reused=set(done), t0=t0, task=task)
    fileio.atomic_write_json(summary.stats_path, summary.to_dict(), indent=1)
    if num_tasks > 1:  # the task that finds every shard done also writes the whole conversion's summary
        everything = {i: s for i, job in enumerate(jobs) if (s := _load_done(job)) is not None}
        if len(everything) == num_shards:
            before = set(everything) - {i for i in mine if i not in done}  # shards not written by this task
            whole = _summary(jobs, everything, out, vecap_json, reused=before, t0=t0, task=(0, 1))
            fileio.atomic_write_json(whole.stats_path, whole.to_dict(), indent=1)
            log.info("all %d shards of %s are done: %s", num_shards, out, whole.stats_path)
    return summary


def _summary(
    jobs: list[_Job],
    stats: dict[int, dict[str, Any]],
    out: str,
    vecap_json: list[str],
    *,
    reused: set[int],
    t0: float,
    task: tuple[int, int],
) -> ConversionSummary:
    shards = []
    for i in sorted(stats):
        s = stats[i]
        shards.append({k: v for k, v in s.items() if k != "fingerprint"} | {"reused": i in reused})
    skipped = collections.Counter()
    for s in shards:
        skipped.update(s["skipped"])
    total = sum(s["records"] for s in shards)
    joined = sum(s["vecap_joined"] for s in shards)
    duplicates, pairs = _cross_shard_duplicates(jobs)
    if duplicates:
        log.warning(
            "%d keys appear in more than one shard (e.g. %s): the same pair may be in two input tars",
            duplicates,
            ", ".join(" and ".join(p) for p in pairs[:3]),
        )
    return ConversionSummary(
        out=out,
        num_shards=len(jobs),
        records=total,
        with_alt_text=sum(s["with_alt_text"] for s in shards),
        with_vecap_text=sum(s["with_vecap_text"] for s in shards),
        vecap_joined=joined,
        vecap_join_rate=(joined / total if total else 0.0) if vecap_json else None,
        skipped={r: skipped[r] for r in SKIP_REASONS if skipped[r]},
        written=len(shards) - len(reused & set(stats)),
        reused=len(reused & set(stats)),
        missing_inputs=[p for s in shards for p in s["missing_inputs"]],
        unreadable_inputs=[p for s in shards for p in s["unreadable_inputs"]],
        seconds=round(time.perf_counter() - t0, 3),
        stats_path=stats_path(out, task),
        shards=shards,
        task=list(task),
        duplicate_keys_across_shards=duplicates,
        duplicate_key_shards=pairs,
    )


def _check_common(out: str, num_shards: int, workers: int) -> str:
    if not out:
        raise ValueError("an output prefix is needed, e.g. /data/vecap/train")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return os.path.abspath(os.path.expanduser(out))


def _vecap_files(vecap_json: str | Sequence[str] | None) -> list[str]:
    if not vecap_json:
        return []
    files = expand_paths(vecap_json)
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"VeCap JSON not found: {f}")
    return [os.path.abspath(f) for f in files]


def _tasks(task: tuple[int, int]) -> tuple[int, int]:
    index, count = task
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"task index {index} is not in [0, {count}) (--task_index, --num_tasks)")
    return index, count


def _file_jobs(
    kind: str,
    inputs: str | Sequence[str],
    out: str,
    num_shards: int,
    fingerprint: dict[str, Any],
    **job: Any,
) -> list[_Job]:
    """Jobs of a conversion of whole input files (tars, Parquet files): output shard j = inputs i % N == j."""
    paths = [os.path.abspath(p) for p in expand_paths(inputs)]
    what = {"webdataset": "input tars", "parquet": "input Parquet files"}[kind]
    if not paths:
        raise ValueError(f"no {what} given")
    if not any(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"none of the {len(paths)} {what} exists (first: {paths[0]})")
    if num_shards > len(paths):
        raise ValueError(
            f"num_shards {num_shards} > {len(paths)} {what}: an output shard is made of whole input "
            f"files, so use at most {len(paths)} shards"
        )
    jobs = []
    for j in range(num_shards):
        shard_inputs = tuple(paths[j::num_shards])
        jobs.append(
            _Job(
                path=records.shard_name(out, j, num_shards),
                stats_path=_shard_stats_path(out, j, num_shards),
                fingerprint={"converter": CONVERTER_VERSION, "kind": kind, "inputs": list(shard_inputs)}
                | fingerprint,
                tars=shard_inputs,
                **job,
            )
        )
    return jobs


def convert_webdataset(
    tars: str | Sequence[str],
    out: str,
    num_shards: int,
    *,
    vecap_json: str | Sequence[str] | None = None,
    source: str | None = None,
    workers: int = 1,
    verify_images: bool = True,
    task: tuple[int, int] = (0, 1),
) -> ConversionSummary:
    """Converts img2dataset webdataset tars into `num_shards` shards OUT-0000j-of-0000N.array_record.

    `tars` and `vecap_json`: comma-separated paths, brace ranges and globs
    (see expand_paths), or lists. Output shard j holds input tars i with
    i % num_shards == j, so num_shards may not exceed the number of tars.
    The AltText is the .txt member (else the .json "caption"), the VeCap
    caption the VeCap JSON's entry for the .json "url". The record key is the
    sample's webdataset key (img2dataset's, unique within one download).
    `source` is stored in every record. Done shards are skipped (resume);
    `workers` processes write shards in parallel. `task` = (i, M): this
    machine writes the shards j with j % M == i (run M machines on one output).
    """
    out = _check_common(out, num_shards, workers)
    vecap_files = _vecap_files(vecap_json)
    jobs = _file_jobs(
        "webdataset",
        tars,
        out,
        num_shards,
        {"vecap_json": vecap_files, "source": source},
        source=source,
        verify_images=verify_images,
    )
    return _convert(jobs, out, vecap_json=vecap_files, workers=workers, task=_tasks(task))


def convert_parquet(
    files: str | Sequence[str],
    out: str,
    num_shards: int,
    *,
    columns: TableColumns = TableColumns(),  # noqa: B008 (frozen: a shared default is safe)
    image_root: str | None = None,
    vecap_json: str | Sequence[str] | None = None,
    source: str | None = None,
    workers: int = 1,
    verify_images: bool = True,
    task: tuple[int, int] = (0, 1),
) -> ConversionSummary:
    """Converts Parquet tables (image bytes or paths, captions) into `num_shards` shards.

    Columns as for tables (`columns`); the image column falls back to the
    first of jpg, jpeg, png, webp, image present (img2dataset, HuggingFace).
    Image cells hold bytes, a {"bytes", "path"} struct, or a path relative to
    `image_root` (default: the working directory). Output shard j holds
    input files i with i % num_shards == j; the key is the key column, else
    FILE-STEM/ROW. `task` as in convert_webdataset.
    """
    out = _check_common(out, num_shards, workers)
    vecap_files = _vecap_files(vecap_json)
    root = os.path.abspath(os.path.expanduser(image_root)) if image_root else ""
    jobs = _file_jobs(
        "parquet",
        files,
        out,
        num_shards,
        {
            "columns": dataclasses.asdict(columns),
            "image_root": root,
            "vecap_json": vecap_files,
            "source": source,
        },
        source=source,
        verify_images=verify_images,
        columns=columns,
        image_root=root,
    )
    return _convert(jobs, out, vecap_json=vecap_files, workers=workers, task=_tasks(task))


def convert_image_folder(
    root: str,
    out: str,
    num_shards: int,
    *,
    captions: str | None = None,
    class_template: str | None = None,
    source: str | None = None,
    workers: int = 1,
    verify_images: bool = True,
    task: tuple[int, int] = (0, 1),
) -> ConversionSummary:
    """Converts an ImageFolder tree (ROOT/CLASS/IMAGE...) with a captions file into `num_shards` shards.

    `captions` and `class_template`: see readers.table.read_image_folder (an
    image without a caption entry takes the template filled with its folder's
    name, else it is skipped as no_caption). Output shard j holds the images r
    (sorted by path) with r % num_shards == j; the key is the relative path.
    """
    out = _check_common(out, num_shards, workers)
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    captions = os.path.abspath(os.path.expanduser(captions)) if captions else None
    if captions and not os.path.isfile(captions):
        raise FileNotFoundError(f"captions file not found: {captions}")
    rows = read_image_folder(root, captions, class_template)
    if num_shards > len(rows):
        raise ValueError(f"num_shards {num_shards} > {len(rows)} images under {root}")
    st = os.stat(captions) if captions else None
    fingerprint = {
        "converter": CONVERTER_VERSION,
        "kind": "image_folder",
        "inputs": [root, len(rows), captions, st.st_size if st else 0, st.st_mtime_ns if st else 0],
        "class_template": class_template,
        "source": source,
    }
    jobs = [
        _Job(
            path=records.shard_name(out, j, num_shards),
            stats_path=_shard_stats_path(out, j, num_shards),
            fingerprint=fingerprint,
            rows=tuple(rows[j::num_shards]),
            source=source,
            verify_images=verify_images,
        )
        for j in range(num_shards)
    ]
    return _convert(jobs, out, vecap_json=[], workers=workers, task=_tasks(task))


def convert_table(
    table: str,
    out: str,
    num_shards: int,
    *,
    image_root: str | None = None,
    columns: TableColumns = TableColumns(),  # noqa: B008 (frozen: a shared default is safe)
    delimiter: str | None = None,
    vecap_json: str | Sequence[str] | None = None,
    source: str | None = None,
    workers: int = 1,
    verify_images: bool = True,
    task: tuple[int, int] = (0, 1),
) -> ConversionSummary:
    """Converts a CSV/TSV table of image paths and captions into `num_shards` shards.

    The first line names the columns (`columns`). Image paths are absolute or
    relative to `image_root` (default: the table's directory). `delimiter`:
    tab for .tsv/.tab files, else comma, unless given. The key is the key
    column's value, else the row number (0 = the first row after the header).
    A row without a VeCap caption takes one from `vecap_json` by its URL
    column. Output shard j holds rows r with r % num_shards == j.
    """
    out = _check_common(out, num_shards, workers)
    table = os.path.abspath(os.path.expanduser(table))
    if not os.path.isfile(table):
        raise FileNotFoundError(f"table not found: {table}")
    root = os.path.abspath(os.path.expanduser(image_root)) if image_root else os.path.dirname(table)
    if delimiter is None:
        delimiter = "\t" if table.lower().endswith((".tsv", ".tab")) else ","
    vecap_files = _vecap_files(vecap_json)
    # The whole table is read here, once, rather than by every worker: workers get their rows.
    rows = read_table(table, columns, root, delimiter, bool(vecap_files))
    if num_shards > len(rows):
        raise ValueError(f"num_shards {num_shards} > {len(rows)} rows in {table}")
    st = os.stat(table)
    jobs = []
    for j in range(num_shards):
        fingerprint = {
            "converter": CONVERTER_VERSION,
            "kind": "table",
            # Size and mtime: an edited table may shift rows between shards.
            "inputs": [table, st.st_size, st.st_mtime_ns],
            "image_root": root,
            "columns": dataclasses.asdict(columns),
            "delimiter": delimiter,
            "vecap_json": vecap_files,
            "source": source,
        }
        jobs.append(
            _Job(
                path=records.shard_name(out, j, num_shards),
                stats_path=_shard_stats_path(out, j, num_shards),
                fingerprint=fingerprint,
                rows=tuple(rows[j::num_shards]),
                source=source,
                verify_images=verify_images,
            )
        )
    return _convert(jobs, out, vecap_json=vecap_files, workers=workers, task=_tasks(task))
