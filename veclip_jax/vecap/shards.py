"""Input shards of a caption run, and the read stage that turns one into mini-batches of images.

Shards are planned as the converter plans its output shards (data/convert.py, whose whole-file
planning is reused): shard j of N holds the input files i with i % N == j (img2dataset tars,
Parquet files; by default N = the number of files), or the rows r with r % N == j (CSV/TSV tables,
ImageFolder trees; by default one shard per 1,000 images). Samples are read with the converter's
readers (data/readers/) and skipped for the converter's reasons (data/skips.py), except that an
image without an AltText is kept: its VeCap caption is made from the image alone.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pickle
from collections.abc import Iterator
from typing import Any

from veclip_jax.data import convert
from veclip_jax.data.convert_shard import _read_image
from veclip_jax.data.image_ops import image_decodes
from veclip_jax.data.paths import expand_paths
from veclip_jax.data.readers.parquet import iter_parquet_rows
from veclip_jax.data.readers.table import Row, TableColumns, read_image_folder, read_table
from veclip_jax.data.readers.webdataset import iter_tar_samples, sample_fields
from veclip_jax.vecap.options import VecapError

# Why an image is not captioned (the converter's reasons where they apply: data/skips.py).
SKIP_REASONS = (
    "missing_file",
    "unreadable_file",
    "bad_record",
    "bad_row",
    "not_success",
    "bad_caption",
    "missing_image",
    "image_not_found",
    "image_outside_root",
    "duplicate_key",
    "undecodable_image",
)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The input, in the converter's forms: exactly one of webdataset, parquet, table, image_folder."""

    webdataset: str | None = None
    parquet: str | None = None
    table: str | None = None
    image_folder: str | None = None
    columns: TableColumns = TableColumns()
    image_root: str | None = None
    delimiter: str | None = None
    captions: str | None = None  # image folders: the AltTexts (read_image_folder)

    @property
    def kind(self) -> str:
        """ "webdataset", "parquet", "table" or "image_folder"."""
        given = [k for k in ("webdataset", "parquet", "table", "image_folder") if getattr(self, k)]
        if len(given) != 1:
            raise VecapError("give exactly one input: --webdataset, --parquet, --table or --image_folder")
        return given[0]


@dataclasses.dataclass(frozen=True)
class Shard:
    """One input shard: what the read task reads, and where its outputs go."""

    index: int
    count: int
    kind: str
    files: tuple[str, ...] = ()  # webdataset tars, Parquet files
    rows: tuple[Row, ...] = ()  # tables, image folders
    columns: TableColumns = TableColumns()
    image_root: str = ""
    inputs_fingerprint: tuple = ()

    def name(self, out: str) -> str:
        """OUT-0000j-of-0000N (the converter's shard naming, without a suffix)."""
        return f"{out}-{self.index:05d}-of-{self.count:05d}"


def json_path(out: str, shard: Shard) -> str:
    """The shard's captions {url or key: caption}."""
    return shard.name(out) + ".json"


def parquet_path(out: str, shard: Shard) -> str:
    """The shard's provenance table (never matches OUT-*.json)."""
    return shard.name(out) + ".provenance.parquet"


def stats_path(out: str) -> str:
    """The run's summary."""
    return f"{out}.vecap_stats.json"


def plan_shards(inputs: Inputs, num_shards: int = 0) -> list[Shard]:
    """The input shards: the converter's rule (j holds files or rows i with i % N == j).

    `num_shards` 0: one shard per input file, or one per 1,000 rows of a table or folder.
    """
    kind = inputs.kind
    if num_shards < 0:
        raise VecapError(f"--num_shards must be >= 0, got {num_shards}")
    if kind in ("webdataset", "parquet"):
        spec = getattr(inputs, kind)
        n = num_shards or len(expand_paths(spec))
        try:
            # The converter's own planning of whole-file shards: its checks and messages.
            jobs = convert._file_jobs(kind, spec, "/vecap-plan", max(n, 1), {})
        except convert.ConversionError as e:
            raise VecapError(str(e).replace("num_shards", "--num_shards")) from None
        root = os.path.abspath(os.path.expanduser(inputs.image_root or os.getcwd()))
        return [
            Shard(
                j,
                n,
                kind,
                files=job.tars,
                columns=inputs.columns,
                image_root=root,
                inputs_fingerprint=tuple(job.tars),
            )
            for j, job in enumerate(jobs)
        ]
    if kind == "table":
        table = os.path.abspath(os.path.expanduser(inputs.table))
        if not os.path.isfile(table):
            raise FileNotFoundError(f"table not found: {table}")
        root = (
            os.path.abspath(os.path.expanduser(inputs.image_root))
            if inputs.image_root
            else os.path.dirname(table)
        )
        delimiter = inputs.delimiter or ("\t" if table.lower().endswith((".tsv", ".tab")) else ",")
        # An AltText is optional here: the caption is made from the image.
        rows = read_table(table, inputs.columns, root, delimiter, has_vecap_json=True)
        st = os.stat(table)
        fingerprint = (table, st.st_size, st.st_mtime_ns)
    else:
        root = os.path.abspath(os.path.expanduser(inputs.image_folder))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        capt = os.path.abspath(os.path.expanduser(inputs.captions)) if inputs.captions else None
        if capt and not os.path.isfile(capt):
            raise FileNotFoundError(f"captions file not found: {capt}")
        rows = read_image_folder(root, capt)
        fingerprint = (root, len(rows), capt, os.stat(capt).st_mtime_ns if capt else 0)
    if not rows:
        raise VecapError(f"no images in {getattr(inputs, kind)}")
    n = num_shards or max(1, math.ceil(len(rows) / 1000))
    if n > len(rows):
        raise VecapError(f"--num_shards {n} > {len(rows)} images")
    return [
        Shard(j, n, kind, rows=tuple(rows[j::n]), image_root=root, inputs_fingerprint=fingerprint)
        for j in range(n)
    ]


def _samples(shard: Shard) -> Iterator[tuple[str, str | None, str | None, bytes] | str]:
    """(key, url, AltText, image bytes) per sample of a shard, or a skip reason."""
    if shard.kind == "webdataset":
        for tar in shard.files:
            for sample in iter_tar_samples(tar):
                if isinstance(sample, str):
                    yield sample
                    continue
                key, members = sample
                fields = sample_fields(members)  # the trainer's and the converter's parsing
                if isinstance(fields, str):
                    yield fields
                elif fields.image is None:
                    yield "missing_image"
                else:
                    yield key, fields.url, fields.alt_text, fields.image
        return
    if shard.kind == "parquet":
        rows: Iterator[Row | str] = (
            r for path in shard.files for r in iter_parquet_rows(path, shard.columns, shard.image_root)
        )
    else:
        rows = iter(shard.rows)
    for row in rows:
        if isinstance(row, str):
            yield row
        elif row.error is not None:
            yield "bad_row"
        elif row.image_bytes is not None:
            yield row.key, row.url, row.alt_text, row.image_bytes
        elif not row.image:
            yield "missing_image"
        else:
            image = _read_image(shard.image_root, row.image)  # confined to the image root
            yield image if isinstance(image, str) else (row.key, row.url, row.alt_text, image)


def read_batches(item: dict[str, Any], *, batch_size: int, progress: Any = None) -> Iterator[dict[str, Any]]:
    """A shard's mini-batches (Ray Data rows); the last one has last=True and may be empty.

    Each mini-batch carries the skips counted since the one before, so the driver's counts are
    complete once the last batch is in.
    """
    shard: Shard = pickle.loads(item["shard"])
    skipped: collections.Counter[str] = collections.Counter()
    seen: set[str] = set()
    batch: dict[str, list] = {"keys": [], "urls": [], "alts": [], "images": []}
    number = 0

    def emit(last: bool) -> dict[str, Any]:
        nonlocal batch, number
        row = {
            "shard": shard.index,
            "batch": number,
            "last": last,
            "skipped": json.dumps(dict(skipped)),
            **batch,
        }
        if progress is not None:
            progress.add.remote("read", len(batch["keys"]))
        skipped.clear()
        batch = {"keys": [], "urls": [], "alts": [], "images": []}
        number += 1
        return row

    pending = None  # held back one step, so the shard's last batch can be marked last
    for sample in _samples(shard):
        if isinstance(sample, str):
            skipped[sample] += 1
            continue
        key, url, alt, image = sample
        join = url or key
        if join in seen:
            skipped["duplicate_key"] += 1
            continue
        if not image_decodes(image):  # the converter's check: such a record would not exist
            skipped["undecodable_image"] += 1
            continue
        seen.add(join)
        for name, value in (("keys", key), ("urls", url), ("alts", alt), ("images", image)):
            batch[name].append(value)
        if len(batch["keys"]) == batch_size:
            if pending is not None:
                yield pending
            pending = emit(False)
    if pending is not None and (batch["keys"] or skipped):
        yield pending
        pending = None
    if pending is not None:
        pending["last"] = True
        yield pending
    else:
        yield emit(True)
