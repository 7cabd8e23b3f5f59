"""Converting raw image-text pairs into ArrayRecord training shards (format v1, records.py).

Inputs:

* img2dataset's webdataset output: tars whose samples are KEY.jpg (or .jpeg,
  .png, .webp), KEY.txt (the AltText) and KEY.json (url, status, caption).
  VeCLIP's released VeCap captions, JSON files {image_url: caption}, are
  joined by URL into `vecap_text`.
* A CSV/TSV table: an image path, the captions, optionally a key and a URL
  per row; images are read from disk.

The readers of these inputs are in data/readers/ (webdataset, parquet,
vecap_json, table), input lists are path specs (data/paths.py).

Sharding rule. Output shard j of N is made of the webdataset input tars i
with i % N == j (whole tars, in order; samples in tar order), or of the table
rows r with r % N == j. A shard is therefore a function of its own inputs
only: one worker writes it alone without reading what another worker reads,
and re-making it after a crash or a deletion gives the same records.

Bad input never stops a conversion: each skipped sample is counted under the
first check it fails, with the reasons the trainer uses too (data/skips.py).
Tar and Parquet samples are parsed by readers/ as the trainer's streamed
reader parses them, so the same tar gives the same samples converted and
streamed.

This module makes a conversion's jobs, one per output shard, from each kind
of input; data/convert_shard.py writes one shard, data/convert_run.py runs
the jobs (tasks, worker processes, resume) and sums up (OUT.stats.json).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from veclip_jax.data import records
from veclip_jax.data.convert_run import (
    ConversionBusyError,
    ConversionError,
    ConversionSummary,
    run_conversion,
    shard_stats_path,
    stats_path,
)
from veclip_jax.data.convert_shard import Job
from veclip_jax.data.paths import expand_paths
from veclip_jax.data.readers.table import TableColumns, read_image_folder, read_table
from veclip_jax.data.skips import CONVERTER_REASONS, REASONS

# Part of every shard's fingerprint: bump when a change to this module or its readers changes
# which records a shard holds, so that a resume does not mix the two versions.
# 3: image paths confined to the image root (issue 22).
CONVERTER_VERSION = 3

# Why samples are skipped, in the order they are checked (a sample counts once): data/skips.py.
SKIP_REASONS: dict[str, str] = {r: REASONS[r] for r in CONVERTER_REASONS}

__all__ = [
    "CONVERTER_VERSION",
    "SKIP_REASONS",
    "ConversionBusyError",
    "ConversionError",
    "ConversionSummary",
    "convert_image_folder",
    "convert_parquet",
    "convert_table",
    "convert_webdataset",
    "stats_path",
]


def _check_common(out: str, num_shards: int, workers: int, ray_address: str | None = None) -> str:
    if not out:
        raise ConversionError("an output prefix is needed, e.g. /data/vecap/train")
    if num_shards < 1:
        raise ConversionError(f"num_shards must be >= 1, got {num_shards}")
    if workers < (0 if ray_address is not None else 1):  # on Ray, 0: as many shards at once as it runs
        raise ConversionError(f"workers must be >= 1, got {workers}")
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
        raise ConversionError(f"task index {index} is not in [0, {count}) (--task_index, --num_tasks)")
    return index, count


def _file_jobs(
    kind: str,
    inputs: str | Sequence[str],
    out: str,
    num_shards: int,
    fingerprint: dict[str, Any],
    **job: Any,
) -> list[Job]:
    """Jobs of a conversion of whole input files (tars, Parquet files): output shard j = inputs i % N == j."""
    paths = [os.path.abspath(p) for p in expand_paths(inputs)]
    what = {"webdataset": "input tars", "parquet": "input Parquet files"}[kind]
    if not paths:
        raise ConversionError(f"no {what} given")
    if not any(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"none of the {len(paths)} {what} exists (first: {paths[0]})")
    if num_shards > len(paths):
        raise ConversionError(
            f"num_shards {num_shards} > {len(paths)} {what}: an output shard is made of whole input "
            f"files, so use at most {len(paths)} shards"
        )
    jobs = []
    for j in range(num_shards):
        shard_inputs = tuple(paths[j::num_shards])
        jobs.append(
            Job(
                path=records.shard_name(out, j, num_shards),
                stats_path=shard_stats_path(out, j, num_shards),
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
    ray_address: str | None = None,
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
    `ray_address` (every convert_* function): the shards are Ray tasks on that
    cluster instead (convert_run.ray_connect; OUT on a file system the nodes
    share; `workers` then caps the shards in flight, 0 = no cap); the same bytes.
    """
    out = _check_common(out, num_shards, workers, ray_address)
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
    return run_conversion(
        jobs, out, vecap_json=vecap_files, workers=workers, task=_tasks(task), ray_address=ray_address
    )


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
    ray_address: str | None = None,
) -> ConversionSummary:
    """Converts Parquet tables (image bytes or paths, captions) into `num_shards` shards.

    Columns as for tables (`columns`); the image column falls back to the
    first of jpg, jpeg, png, webp, image present (img2dataset, HuggingFace).
    Image cells hold bytes, a {"bytes", "path"} struct, or a path relative to
    `image_root` (default: the working directory), and only those resolving inside it are read
    (others are skipped as image_outside_root). Output shard j holds
    input files i with i % num_shards == j; the key is the key column, else
    FILE-STEM/ROW. `task` as in convert_webdataset.
    """
    out = _check_common(out, num_shards, workers, ray_address)
    vecap_files = _vecap_files(vecap_json)
    # The root is explicit (the working directory by default) so that path cells can be confined to it.
    root = os.path.abspath(os.path.expanduser(image_root or os.getcwd()))
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
    return run_conversion(
        jobs, out, vecap_json=vecap_files, workers=workers, task=_tasks(task), ray_address=ray_address
    )


def convert_image_folder(
    root: str,
    out: str,
    num_shards: int,
    *,
    captions: str | None = None,
    class_template: str | None = None,
    vecap_json: str | Sequence[str] | None = None,
    source: str | None = None,
    workers: int = 1,
    verify_images: bool = True,
    task: tuple[int, int] = (0, 1),
    ray_address: str | None = None,
) -> ConversionSummary:
    """Converts an ImageFolder tree (ROOT/CLASS/IMAGE...) with a captions file into `num_shards` shards.

    `captions` and `class_template`: see readers.table.read_image_folder (an
    image without a caption entry takes the template filled with its folder's
    name, else it is skipped as no_caption). Output shard j holds the images r
    (sorted by path) with r % num_shards == j; the key is the relative path, by
    which `vecap_json` captions are joined (images have no URL; make_vecap writes keys).
    """
    out = _check_common(out, num_shards, workers, ray_address)
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    captions = os.path.abspath(os.path.expanduser(captions)) if captions else None
    if captions and not os.path.isfile(captions):
        raise FileNotFoundError(f"captions file not found: {captions}")
    rows = read_image_folder(root, captions, class_template)
    vecap_files = _vecap_files(vecap_json)
    if num_shards > len(rows):
        raise ConversionError(f"num_shards {num_shards} > {len(rows)} images under {root}")
    st = os.stat(captions) if captions else None
    fingerprint = {
        "converter": CONVERTER_VERSION,
        "kind": "image_folder",
        "inputs": [root, len(rows), captions, st.st_size if st else 0, st.st_mtime_ns if st else 0],
        "class_template": class_template,
        "source": source,
    } | ({"vecap_json": vecap_files} if vecap_files else {})  # unchanged for outputs made without
    jobs = [
        Job(
            path=records.shard_name(out, j, num_shards),
            stats_path=shard_stats_path(out, j, num_shards),
            fingerprint=fingerprint,
            rows=tuple(rows[j::num_shards]),
            image_root=root,  # a symlink in the tree pointing out of it is not followed
            source=source,
            verify_images=verify_images,
        )
        for j in range(num_shards)
    ]
    return run_conversion(
        jobs, out, vecap_json=vecap_files, workers=workers, task=_tasks(task), ray_address=ray_address
    )


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
    ray_address: str | None = None,
) -> ConversionSummary:
    """Converts a CSV/TSV table of image paths and captions into `num_shards` shards.

    The first line names the columns (`columns`). Image paths are absolute or
    relative to `image_root` (default: the table's directory); a path resolving
    outside it (`../`, elsewhere, a symlink out) is skipped as image_outside_root. `delimiter`:
    tab for .tsv/.tab files, else comma, unless given. The key is the key
    column's value, else the row number (0 = the first row after the header).
    A row without a VeCap caption takes one from `vecap_json` by its URL
    column. Output shard j holds rows r with r % num_shards == j.
    """
    out = _check_common(out, num_shards, workers, ray_address)
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
        raise ConversionError(f"num_shards {num_shards} > {len(rows)} rows in {table}")
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
            Job(
                path=records.shard_name(out, j, num_shards),
                stats_path=shard_stats_path(out, j, num_shards),
                fingerprint=fingerprint,
                rows=tuple(rows[j::num_shards]),
                image_root=root,
                source=source,
                verify_images=verify_images,
            )
        )
    return run_conversion(
        jobs, out, vecap_json=vecap_files, workers=workers, task=_tasks(task), ray_address=ray_address
    )
