"""CSV/TSV tables of image-text pairs: a header line naming the columns, then one pair per row."""

from __future__ import annotations

import csv
import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class TableColumns:
    """Column names of a CSV/TSV table. Only `image` is required; key and URL are optional."""

    image: str = "image"
    alt_text: str = "alt_text"
    vecap_text: str = "vecap_text"
    key: str = "key"
    url: str = "url"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a table, as read: captions as written (None when the row has no such cell)."""

    key: str
    image: str  # absolute path, or "" when the row has none
    alt_text: str | None
    vecap_text: str | None
    url: str | None


def read_table(
    path: str, columns: TableColumns, image_root: str, delimiter: str, has_vecap_json: bool
) -> list[Row]:
    """All rows of the table at `path`; raises ValueError, naming the table, when it cannot give pairs.

    Image paths are joined to `image_root` (an absolute path stays as it is).
    The key is the key column's value, else the row number (0 = the first row
    after the header). A table needs a caption column, or a URL column when
    `has_vecap_json` (captions joined by URL); if a column name appears twice,
    the first is read.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"table {path} is empty")
        where = {name: i for i, name in reversed(list(enumerate(header)))}
        if columns.image not in where:
            raise ValueError(f"table {path} has no image column {columns.image!r} (its columns: {header})")
        has = {field: getattr(columns, field) in where for field in ("alt_text", "vecap_text", "key", "url")}
        if not (has["alt_text"] or has["vecap_text"] or (has["url"] and has_vecap_json)):
            raise ValueError(
                f"table {path} has no caption: no column {columns.alt_text!r} or {columns.vecap_text!r}, "
                f"nor a {columns.url!r} column with VeCap JSON to join (its columns: {header})"
            )

        def cell(row: list[str], field: str) -> str | None:
            i = where.get(getattr(columns, field))
            return row[i] if i is not None and i < len(row) else None

        rows = []
        for r, row in enumerate(reader):
            image = (cell(row, "image") or "").strip()
            if image:
                image = os.path.join(image_root, os.path.expanduser(image))  # an absolute path stays
            rows.append(
                Row(
                    key=(cell(row, "key") or "").strip() or str(r),
                    image=image,
                    alt_text=cell(row, "alt_text"),
                    vecap_text=cell(row, "vecap_text"),
                    url=(cell(row, "url") or "").strip() or None,
                )
            )
    return rows
