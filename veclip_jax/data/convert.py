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
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from veclip_jax import fileio
from veclip_jax.data import captions, records
from veclip_jax.data.image_ops import image_decodes
from veclip_jax.data.paths import expand_paths
from veclip_jax.data.readers.table import Row, TableColumns, read_table
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
    tars: tuple[str, ...] = ()
    rows: tuple[Row, ...] = ()
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


def _table_outcomes(job: _Job, lookup: VecapLookup | None) -> Iterator[_Outcome]:
    for row in job.rows:
        yield _table_candidate(row, lookup, job.source), row.image


def _table_candidate(row: Row, lookup: VecapLookup | None, source: str | None) -> _Candidate | str:
    if row.error is not None:
        return "bad_row"
    if not row.image:
        return "no_image"
    alt, vecap, joined = _caption(row.alt_text), _caption(row.vecap_text), False
    if vecap is None and lookup is not None and row.url:
        vecap = _caption(lookup(row.url))
        joined = vecap is not None
    if alt is None and vecap is None:
        return "no_caption"
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
    outcomes = _table_outcomes if job.fingerprint["kind"] == "table" else _webdataset_outcomes
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
    shards: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what OUT-stats.json holds)."""
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
        lines.append(f"  stats: {self.stats_path}")
        return "\n".join(lines)


def stats_path(out: str) -> str:
    """Where a conversion into prefix `out` writes its summary: OUT-stats.json."""
    return f"{out}-stats.json"


def _shard_stats_path(out: str, index: int, num_shards: int) -> str:
    return os.path.join(f"{out}-shard-stats", f"{index:05d}-of-{num_shards:05d}.json")


def _vecap_index_path(out: str) -> str:
    return f"{out}-vecap-index.sqlite"


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


def _convert(
    jobs: list[_Job],
    out: str,
    *,
    vecap_json: list[str],
    workers: int,
) -> ConversionSummary:
    t0 = time.perf_counter()
    num_shards = len(jobs)
    os.makedirs(os.path.dirname(_shard_stats_path(out, 0, 1)), exist_ok=True)
    done = {i: s for i, job in enumerate(jobs) if (s := _load_done(job)) is not None}
    pending = [job for i, job in enumerate(jobs) if i not in done]
    log.info("%d of %d shards to write (%d done before)", len(pending), num_shards, len(done))
    index_path = _vecap_index_path(out)
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
        os.remove(index_path)  # every shard is done: the index is only needed to resume

    shards = []
    for i, job in enumerate(jobs):
        stats = done.get(i) or results[os.path.basename(job.path)]
        shards.append({k: v for k, v in stats.items() if k != "fingerprint"} | {"reused": i in done})
    skipped = collections.Counter()
    for s in shards:
        skipped.update(s["skipped"])
    total = sum(s["records"] for s in shards)
    joined = sum(s["vecap_joined"] for s in shards)
    summary = ConversionSummary(
        out=out,
        num_shards=num_shards,
        records=total,
        with_alt_text=sum(s["with_alt_text"] for s in shards),
        with_vecap_text=sum(s["with_vecap_text"] for s in shards),
        vecap_joined=joined,
        vecap_join_rate=(joined / total if total else 0.0) if vecap_json else None,
        skipped={r: skipped[r] for r in SKIP_REASONS if skipped[r]},
        written=len(pending),
        reused=len(done),
        missing_inputs=[p for s in shards for p in s["missing_inputs"]],
        unreadable_inputs=[p for s in shards for p in s["unreadable_inputs"]],
        seconds=round(time.perf_counter() - t0, 3),
        stats_path=stats_path(out),
        shards=shards,
    )
    fileio.atomic_write_json(summary.stats_path, summary.to_dict(), indent=1)
    return summary


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


def convert_webdataset(
    tars: str | Sequence[str],
    out: str,
    num_shards: int,
    *,
    vecap_json: str | Sequence[str] | None = None,
    source: str | None = None,
    workers: int = 1,
    verify_images: bool = True,
) -> ConversionSummary:
    """Converts img2dataset webdataset tars into `num_shards` shards OUT-0000j-of-0000N.array_record.

    `tars` and `vecap_json`: comma-separated paths, brace ranges and globs
    (see expand_paths), or lists. Output shard j holds input tars i with
    i % num_shards == j, so num_shards may not exceed the number of tars.
    The AltText is the .txt member (else the .json "caption"), the VeCap
    caption the VeCap JSON's entry for the .json "url". The record key is the
    sample's webdataset key (img2dataset's, unique within one download).
    `source` is stored in every record. Done shards are skipped (resume);
    `workers` processes write shards in parallel.
    """
    out = _check_common(out, num_shards, workers)
    paths = [os.path.abspath(p) for p in expand_paths(tars)]
    if not paths:
        raise ValueError("no input tars given")
    if not any(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"none of the {len(paths)} input tars exists (first: {paths[0]})")
    if num_shards > len(paths):
        raise ValueError(
            f"num_shards {num_shards} > {len(paths)} input tars: an output shard is made of whole input "
            f"tars, so use at most {len(paths)} shards"
        )
    vecap_files = _vecap_files(vecap_json)
    jobs = []
    for j in range(num_shards):
        shard_tars = tuple(paths[j::num_shards])
        fingerprint = {
            "converter": CONVERTER_VERSION,
            "kind": "webdataset",
            "inputs": list(shard_tars),
            "vecap_json": vecap_files,
            "source": source,
        }
        jobs.append(
            _Job(
                path=records.shard_name(out, j, num_shards),
                stats_path=_shard_stats_path(out, j, num_shards),
                fingerprint=fingerprint,
                tars=shard_tars,
                source=source,
                verify_images=verify_images,
            )
        )
    return _convert(jobs, out, vecap_json=vecap_files, workers=workers)


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
    return _convert(jobs, out, vecap_json=vecap_files, workers=workers)
