"""Writing one output shard of a conversion (data/convert.py): its inputs -> records, skips counted.

Runs in a worker process (a Job is pickled to it) or in the caller's. Each
input sample becomes a record or is skipped under the first check it fails,
with the reasons of data/skips.py. Tar and Parquet samples are parsed by
readers/ exactly as the trainer's streamed reader parses them
(readers/webdataset.py `sample_fields`, readers/cells.py), so the same input
gives the same samples converted and streamed; the converter adds the VeCap
join by URL and its own checks (duplicate keys, images that do not decode).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import stat
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from veclip_jax import fileio
from veclip_jax.data import captions, records
from veclip_jax.data.image_ops import image_decodes
from veclip_jax.data.readers.parquet import iter_parquet_rows
from veclip_jax.data.readers.table import Row, TableColumns, confine
from veclip_jax.data.readers.vecap_json import VecapLookup
from veclip_jax.data.readers.webdataset import iter_tar_samples, sample_fields
from veclip_jax.data.skips import CONVERTER_REASONS


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything one worker needs to write one output shard (pickled to spawned workers)."""

    path: str
    stats_path: str
    fingerprint: dict[str, Any]
    tars: tuple[str, ...] = ()  # webdataset tars, or Parquet files
    rows: tuple[Row, ...] = ()
    columns: TableColumns = TableColumns()  # Parquet
    image_root: str = ""  # tables, Parquet, folders: image paths must resolve inside it
    vecap_index: str | None = None
    source: str | None = None
    verify_images: bool = True


@dataclasses.dataclass
class _Candidate:
    record: records.Record
    vecap_joined: bool  # vecap_text came from the VeCap JSON


# A candidate record, or the reason it was skipped; with where it came from (a tar or an image file).
_Outcome = tuple[_Candidate | str, str]


def _caption(value: str | None) -> str | None:
    """The text as it is, or None when it cleans to nothing (the loader cleans)."""
    return value if captions.clean_caption(value) else None


def _webdataset_outcomes(job: Job, lookup: VecapLookup | None) -> Iterator[_Outcome]:
    for tar in job.tars:
        for sample in iter_tar_samples(tar):
            if isinstance(sample, str):
                yield sample, tar
            else:
                yield _webdataset_candidate(*sample, lookup, job.source), tar


def _webdataset_candidate(
    key: str, members: dict[str, bytes], lookup: VecapLookup | None, source: str | None
) -> _Candidate | str:
    sample = sample_fields(members)  # the trainer's reading of a tar sample
    if isinstance(sample, str):
        return sample
    alt = _caption(sample.alt_text)
    # Joined by URL; a sample without one by its key (launch/make_vecap.py writes keys then).
    vecap = _caption(lookup(sample.url if sample.url is not None else key)) if lookup is not None else None
    if alt is None and vecap is None:
        return "empty_caption"
    if sample.image is None:
        return "missing_image"
    record = records.Record(key=key, jpeg=sample.image, alt_text=alt, vecap_text=vecap, source=source)
    return _Candidate(record, vecap_joined=vecap is not None)


def _parquet_outcomes(job: Job, lookup: VecapLookup | None) -> Iterator[_Outcome]:
    for path in job.tars:
        for row in iter_parquet_rows(path, job.columns, job.image_root):
            if isinstance(row, str):
                yield row, path
            else:
                yield _table_candidate(row, lookup, job.source, job.image_root), path


def _table_outcomes(job: Job, lookup: VecapLookup | None) -> Iterator[_Outcome]:
    for row in job.rows:
        yield _table_candidate(row, lookup, job.source, job.image_root), row.image


def _read_image(root: str, path: str) -> bytes | str:
    """The bytes of the image file at `path`, or the skip reason: outside `root`, or not found."""
    real = confine(root, path)
    if real is None:
        return "image_outside_root"
    try:
        # O_NOFOLLOW: `real` has no symlink left; one put there since confine() is refused.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return "image_not_found"  # a FIFO or device would block or never end
            return f.read()
    except OSError:
        return "image_not_found"


def _table_candidate(row: Row, lookup: VecapLookup | None, source: str | None, root: str) -> _Candidate | str:
    if row.error is not None:
        return "bad_row"
    alt, vecap, joined = _caption(row.alt_text), _caption(row.vecap_text), False
    if vecap is None and lookup is not None:
        vecap = _caption(lookup(row.url or row.key))  # by key without a URL, as make_vecap writes
        joined = vecap is not None
    if alt is None and vecap is None:
        return "empty_caption"
    if row.image_bytes is not None:
        image = row.image_bytes
    elif not row.image:
        return "missing_image"
    else:
        image = _read_image(root, row.image)
        if isinstance(image, str):
            return image
    record = records.Record(key=row.key, jpeg=image, alt_text=alt, vecap_text=vecap, source=source)
    return _Candidate(record, vecap_joined=joined)


def shard_keys_path(stats: str) -> str:
    """Where a shard leaves its key hashes, beside its stats file."""
    return stats.removesuffix(".json") + ".keys.npy"


def _key_hashes(keys: Sequence[str]) -> np.ndarray:
    """Sorted 64-bit hashes of record keys: what a shard leaves behind to find keys repeated across shards."""
    h = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys]
    return np.sort(np.asarray(h, np.uint64))


def write_shard(job: Job) -> dict[str, Any]:
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
                    if item == "missing_file":
                        missing_inputs.append(where)
                    elif item == "unreadable_file":
                        unreadable_inputs.append(where)
                    continue
                record = item.record
                if record.key in seen:
                    skipped["duplicate_key"] += 1
                    continue
                if job.verify_images and not image_decodes(record.jpeg):
                    skipped["undecodable_image"] += 1
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
    unknown = set(skipped) - set(CONVERTER_REASONS)
    if unknown:  # a bug: every skip is named in data/skips.py, the converter's and the trainer's one table
        raise AssertionError(f"skip reasons {sorted(unknown)} are not in data/skips.py CONVERTER_REASONS")
    stats = {
        "shard": os.path.basename(job.path),
        "records": count,
        "with_alt_text": with_alt,
        "with_vecap_text": with_vecap,
        "vecap_joined": joined,
        "skipped": {r: skipped[r] for r in CONVERTER_REASONS if skipped[r]},
        "missing_inputs": missing_inputs,
        "unreadable_inputs": unreadable_inputs,
        "seconds": round(time.perf_counter() - t0, 3),
        "fingerprint": job.fingerprint,
    }
    keys = io.BytesIO()
    np.save(keys, _key_hashes(sorted(seen)))
    # Before the stats (the done marker), and whole or absent: a disk filling here must not leave a
    # truncated file that the summary's duplicate check would then fail to read.
    fileio.atomic_write_bytes(shard_keys_path(job.stats_path), keys.getvalue())
    fileio.atomic_write_json(job.stats_path, stats, indent=1)  # a stats file is complete or absent
    return stats
