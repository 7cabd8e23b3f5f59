"""CSV/TSV tables of image-text pairs: a header line naming the columns, then one pair per row.

A table scraped from the web is rarely clean: a row with a byte that is not
UTF-8, a NUL, an unbalanced quote that swallows the file, a cell beyond the
csv module's size limit. Such rows are returned as bad rows (`Row.error`,
naming the file and line) for the converter to skip and count; they never
stop the conversion.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os

from veclip_jax.errors import UserError

log = logging.getLogger(__name__)


class TableError(UserError, ValueError):
    """A table that cannot give pairs at all (no header, no image or caption column): exit 2."""


def confine(root: str, path: str) -> str | None:
    """`path` (absolute, or relative to `root`) fully resolved, or None when it lies outside `root`.

    Symlinks are resolved in both, so neither `../`, an absolute path elsewhere, nor a
    symlink under the root pointing out of it reaches a file outside: a table's cells are
    data from the web, and what they name is copied into the shards.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    return real if os.path.commonpath([real_root, real]) == real_root else None


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
    error: str | None = None  # why the row is unusable ("FILE line N: ..."); None for a good row
    image_bytes: bytes | None = None  # the image itself (Parquet cells), instead of a file at `image`


def _has_undecodable(cells: list[str]) -> bool:
    # surrogateescape turns each byte that is not UTF-8 into a lone surrogate U+DC80..U+DCFF.
    return any(any("\udc80" <= ch <= "\udcff" for ch in cell) for cell in cells if not cell.isascii())


def read_table(
    path: str, columns: TableColumns, image_root: str, delimiter: str, has_vecap_json: bool
) -> list[Row]:
    """All rows of the table at `path`; raises TableError, naming the table, when it cannot give pairs.

    Image paths are joined to `image_root` (an absolute path stays as it is; a `~` is a name,
    not a home directory); the converter reads only those that resolve inside it (`confine`).
    The key is the key column's value, else the row number (0 = the first row
    after the header). A table needs a caption column, or a URL column when
    `has_vecap_json` (captions joined by URL); if a column name appears twice,
    the first is read. A row that is not valid UTF-8, or that the csv module
    refuses (a NUL, an oversized cell), comes back with `error` set ("FILE
    line N: why"), logged once per table with the count.
    """
    # surrogateescape: a stray non-UTF-8 byte must cost its row, not the whole table.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise TableError(f"table {path}: the header line cannot be read: {e}") from None
        if header is None:
            raise TableError(f"table {path} is empty")
        if _has_undecodable(header):
            raise TableError(f"table {path}: the header line is not UTF-8")
        where = {name: i for i, name in reversed(list(enumerate(header)))}
        if columns.image not in where:
            raise TableError(f"table {path} has no image column {columns.image!r} (its columns: {header})")
        has = {field: getattr(columns, field) in where for field in ("alt_text", "vecap_text", "key", "url")}
        if not (has["alt_text"] or has["vecap_text"] or (has["url"] and has_vecap_json)):
            raise TableError(
                f"table {path} has no caption: no column {columns.alt_text!r} or {columns.vecap_text!r}, "
                f"nor a {columns.url!r} column with VeCap JSON to join (its columns: {header})"
            )

        def cell(row: list[str], field: str) -> str | None:
            i = where.get(getattr(columns, field))
            return row[i] if i is not None and i < len(row) else None

        used = [f for f in ("image", "alt_text", "vecap_text", "key", "url") if f == "image" or has[f]]
        rows: list[Row] = []
        bad: list[str] = []
        while True:
            r = len(rows)
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # a NUL byte, a cell over csv.field_size_limit(), ...
                bad.append(f"{path} line {reader.line_num}: {e}")
                rows.append(
                    Row(key=str(r), image="", alt_text=None, vecap_text=None, url=None, error=bad[-1])
                )
                continue
            if _has_undecodable([cell(row, f) or "" for f in used]):  # bytes in other columns do no harm
                bad.append(f"{path} line {reader.line_num}: not UTF-8")
                rows.append(
                    Row(key=str(r), image="", alt_text=None, vecap_text=None, url=None, error=bad[-1])
                )
                continue
            image = (cell(row, "image") or "").strip()
            if image:
                image = os.path.join(image_root, image)  # an absolute path stays: confine() judges it
            rows.append(
                Row(
                    key=(cell(row, "key") or "").strip() or str(r),
                    image=image,
                    alt_text=cell(row, "alt_text"),
                    vecap_text=cell(row, "vecap_text"),
                    url=(cell(row, "url") or "").strip() or None,
                )
            )
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        log.warning("table %s: %d unreadable rows skipped: %s%s", path, len(bad), "; ".join(bad[:3]), more)
    return rows


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def read_image_folder(root: str, captions: str | None, class_template: str | None = None) -> list[Row]:
    """The images under `root` (an ImageFolder tree, sorted) as Rows, captioned from a captions file.

    `captions`: a JSON object {relative path: caption, or {"alt_text": ..., "vecap_text": ...}}, or
    JSON lines {"image": relative path, "alt_text"/"caption": ..., "vecap_text": ...}. An image
    without an entry takes `class_template` filled with its folder's name ("a photo of a {}."),
    else no caption (the converter skips it as no_caption). The key is the relative path.
    """
    import json

    entries: dict[str, dict[str, str | None]] = {}
    if captions:
        with open(captions, encoding="utf-8", errors="replace") as f:
            text = f.read()
        try:
            whole = json.loads(text)
            items = whole.items() if isinstance(whole, dict) else None
        except ValueError:
            whole, items = None, None
        if items is None:  # JSON lines
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    items.append((obj["image"], obj))
                except (ValueError, KeyError, TypeError):
                    log.warning(
                        "captions %s line %d: not a JSON object with an 'image': skipped", captions, n
                    )
        for rel, value in items:
            if isinstance(value, str):
                value = {"alt_text": value}
            if isinstance(value, dict):
                alt = value.get("alt_text", value.get("caption"))
                entries[os.path.normpath(str(rel))] = {"alt_text": alt, "vecap_text": value.get("vecap_text")}
    rows = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            entry = entries.get(rel) or entries.get(os.path.splitext(rel)[0]) or {}
            alt = entry.get("alt_text")
            if alt is None and class_template and os.path.dirname(rel):
                alt = class_template.format(os.path.basename(os.path.dirname(rel)).replace("_", " "))
            rows.append(Row(key=rel, image=path, alt_text=alt, vecap_text=entry.get("vecap_text"), url=None))
    return rows
