"""Parquet tables of image-text pairs (img2dataset's parquet output, HuggingFace datasets' files).

A row holds the image itself (bytes; a HuggingFace Image struct {"bytes", "path"}) or a path to it,
captions, and optionally a key and a URL, in columns named like a CSV table's (TableColumns).
Read in record batches, so a file larger than memory streams. Caption cells
follow readers/cells.py's rule for the converter (`iter_parquet_rows`) and the
trainer's streamed reader (`row_fields`) alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from veclip_jax.data.readers.cells import caption_text
from veclip_jax.data.readers.table import Row, TableColumns

log = logging.getLogger(__name__)

# img2dataset writes the image to a column named after its format; HF datasets use "image".
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")

# A file with a row group whose columns to read take more bytes than this (compressed or not, per
# the file's metadata) is skipped, "unreadable_file", before a row is read: a 10.6 KB file's row
# group expanded to 1.5 GB. img2dataset writes a whole shard (10,000 images) as one row group.
MAX_ROW_GROUP_BYTES = 1 << 30
# Rows are decoded a batch at a time, this many bytes at most: a row's value is no larger than its
# column chunk, but dictionary encoding lets many rows repeat one large value (a 705-byte file held
# 200 rows of the same 1 MiB image), so the metadata alone does not bound a row group's rows.
_BATCH_BYTES = 64 << 20
_MAX_BATCH_ROWS = 256


class RowGroupTooLarge(ValueError):
    """A Parquet row group over MAX_ROW_GROUP_BYTES (from the file's metadata)."""


def bounded_batches(path: str, columns: list[str] | None = None) -> Iterator[Any]:
    """The pyarrow RecordBatches of a Parquet file (`columns`, or all), with bounded memory.

    Every row group's size is checked from the metadata before anything is
    read: RowGroupTooLarge (a ValueError) if one exceeds MAX_ROW_GROUP_BYTES.
    Each row group is then read in batches of at most _BATCH_BYTES / (its
    size) rows (one at least), so a batch decodes to at most _BATCH_BYTES, or
    one row, however often dictionary encoding repeats a value.
    """
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    meta = f.metadata
    wanted = None if columns is None else set(columns)
    sizes = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        size = 0
        for j in range(rg.num_columns):
            chunk = rg.column(j)
            if wanted is None or chunk.path_in_schema.split(".")[0] in wanted:
                size += max(chunk.total_compressed_size, chunk.total_uncompressed_size, 0)
        if size > MAX_ROW_GROUP_BYTES:
            log.warning(
                "%s: row group %d takes %d bytes, over %d: file skipped", path, i, size, MAX_ROW_GROUP_BYTES
            )
            raise RowGroupTooLarge(f"{path}: row group {i} takes {size} bytes, over {MAX_ROW_GROUP_BYTES}")
        sizes.append(size)
    for i, size in enumerate(sizes):
        rows = max(1, min(_MAX_BATCH_ROWS, _BATCH_BYTES // max(size, 1)))
        yield from f.iter_batches(batch_size=rows, row_groups=[i], columns=columns)


def _image_cell(value: Any, image_root: str) -> tuple[str, bytes | None]:
    """(path, bytes) of an image cell: bytes inline, a struct with bytes or a path, or a path string."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return "", bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return "", bytes(value)
    if isinstance(value, str) and value.strip():
        return os.path.join(image_root, os.path.expanduser(value.strip())), None
    return "", None


def row_fields(
    row: Mapping[str, Any], *, image_field: str, alt_text_field: str, vecap_text_field: str
) -> tuple[Any, str | None, str | None] | str:
    """(image, alt, vecap) of one streamed row ({column: value}), or "bad_caption" (data/skips.py).

    `image_field` "" takes the first of IMAGE_COLUMNS present; a HuggingFace
    Image struct gives its bytes. A caption field "none" reads no caption.
    """
    if image_field:
        image = row.get(image_field)
    else:
        image = next((row[c] for c in IMAGE_COLUMNS if c in row), None)
    if isinstance(image, dict):  # HuggingFace datasets' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes")
    try:
        alt = None if alt_text_field == "none" else caption_text(row.get(alt_text_field))
        vecap = None if vecap_text_field == "none" else caption_text(row.get(vecap_text_field))
    except ValueError:
        return "bad_caption"
    return image, alt, vecap


def iter_parquet_rows(path: str, columns: TableColumns, image_root: str) -> Iterator[Row | str]:
    """The rows of one Parquet file as table Rows (image bytes inline) or skip reasons (data/skips.py).

    The image column is `columns.image` if the file has it, else the first of IMAGE_COLUMNS; the
    AltText column `columns.alt_text`, else "caption" (img2dataset). The key
    is the key column's value, else FILE-STEM/ROW. A row whose caption cell is not UTF-8 text
    yields "bad_caption". A file that cannot be opened or is damaged part-way yields its rows up
    to the damage, then "unreadable_file"; one with a row group over MAX_ROW_GROUP_BYTES yields
    "unreadable_file" alone (bounded_batches).
    """
    import pyarrow.parquet as pq

    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        f = pq.ParquetFile(path)
        names = set(f.schema_arrow.names)
        image = (
            columns.image if columns.image in names else next((c for c in IMAGE_COLUMNS if c in names), None)
        )
        wanted = {"image": image} | {
            field: getattr(columns, field)
            for field in ("alt_text", "vecap_text", "key", "url")
            if getattr(columns, field) in names
        }
        if "alt_text" not in wanted and "caption" in names:
            wanted["alt_text"] = "caption"  # img2dataset's name for the AltText
        r = 0
        for batch in bounded_batches(path, sorted({c for c in wanted.values() if c})):
            for cells in batch.to_pylist():
                img_path, img_bytes = _image_cell(cells.get(image) if image else None, image_root)

                def cell(field: str, cells: dict = cells) -> Any:
                    return cells.get(wanted.get(field)) if wanted.get(field) else None

                def text(field: str) -> str | None:
                    value = cell(field)
                    return value if isinstance(value, str) else None

                key = (text("key") or "").strip() or f"{stem}/{r}"
                r += 1
                try:
                    alt, vecap = caption_text(cell("alt_text")), caption_text(cell("vecap_text"))
                except ValueError:
                    yield "bad_caption"
                    continue
                yield Row(
                    key=key,
                    image=img_path,
                    alt_text=alt,
                    vecap_text=vecap,
                    url=(text("url") or "").strip() or None,
                    image_bytes=img_bytes,
                )
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; missing files OSError
        del e
        yield "unreadable_file"
