"""VeCLIP's released VeCap captions: JSON objects {image_url: caption}, some 30M entries per file.

iter_vecap_json streams one file; build_vecap_index puts them all into an
SQLite file that VecapLookup queries by URL, from any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

_NON_SPACE = re.compile(r"[^ \t\n\r]")
_DECODER = json.JSONDecoder()


class _JsonScanner:
    """Reads JSON values one at a time from a text stream, holding about one chunk in memory."""

    def __init__(self, f: io.TextIOBase, chunk_chars: int):
        self._f, self._chunk = f, chunk_chars
        self._buf, self._pos, self._consumed, self._eof = "", 0, 0, False

    @property
    def offset(self) -> int:
        """Characters read so far (for error messages)."""
        return self._consumed + self._pos

    def _fill(self) -> bool:
        if self._eof:
            return False
        more = self._f.read(self._chunk)
        if not more:
            self._eof = True
            return False
        self._consumed += self._pos
        self._buf, self._pos = self._buf[self._pos :] + more, 0
        return True

    def peek(self) -> str:
        """The next non-whitespace character (not consumed); "" at the end."""
        while True:
            m = _NON_SPACE.search(self._buf, self._pos)
            if m:
                self._pos = m.start()
                return self._buf[self._pos]
            self._pos = len(self._buf)
            if not self._fill():
                return ""

    def take(self, ch: str) -> None:
        if self.peek() != ch:
            raise ValueError(f"expected {ch!r} at character {self.offset}")
        self._pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self._buf, self._pos)
                # A value that ends the buffer may continue in the next chunk (a number).
                if end < len(self._buf) or self._eof:
                    self._pos = end
                    return value
            except json.JSONDecodeError as e:
                if self._eof:
                    raise ValueError(f"bad JSON at character {self._consumed + e.pos}: {e.msg}") from None
            self._fill()


def iter_vecap_json(path: str | os.PathLike, *, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """The (url, caption) pairs of one VeCap JSON file, an object {url: caption}, streamed.

    VeCap-300M's files hold some 30M captions each: `json.load` would need tens
    of GB, this holds one chunk. Values are yielded as they are (the caller
    keeps strings). `.gz` files are decompressed. Raises ValueError, naming
    the file and position, on anything that is not one JSON object.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    # A stray non-UTF-8 byte becomes U+FFFD in its caption rather than stopping a 30M-caption file.
    with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
        scan = _JsonScanner(f, chunk_chars)
        try:
            if scan.peek() != "{":
                raise ValueError("expected a JSON object {url: caption}")
            scan.take("{")
            if scan.peek() == "}":
                scan.take("}")
            else:
                while True:
                    key = scan.value()
                    if not isinstance(key, str):
                        raise ValueError(f"expected a string key at character {scan.offset}")
                    scan.take(":")
                    yield key, scan.value()
                    if scan.peek() == ",":
                        scan.take(",")
                    else:
                        scan.take("}")
                        break
            if scan.peek() != "":
                raise ValueError(f"unexpected data after the object at character {scan.offset}")
        except ValueError as e:
            raise ValueError(f"VeCap JSON {path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class VecapIndexInfo:
    """What went into a VeCap index."""

    path: str
    files: list[str]
    captions: int  # string captions indexed (a URL repeated in a later file is indexed once)
    ignored: int  # entries whose value is not a string


def _files_fingerprint(paths: Sequence[str]) -> list[list]:
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def build_vecap_index(json_files: Sequence[str], path: str) -> VecapIndexInfo:
    """Builds (or reuses) an SQLite index url -> caption from VeCap JSON files at `path`.

    An index rather than a dict: hundreds of millions of captions do not fit in
    each worker's memory, and SQLite (stdlib) lets every worker look up by URL
    in one shared file. Rebuilt only when the JSON files changed (paths, sizes,
    mtimes), so a resumed conversion does not re-read them. For a URL present
    twice, the first file's caption wins (files in the order given).
    """
    fingerprint = json.dumps(_files_fingerprint(json_files))
    if os.path.exists(path):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                row = db.execute("SELECT fingerprint, captions, ignored FROM meta").fetchone()
            if row and row[0] == fingerprint:
                return VecapIndexInfo(path, list(json_files), row[1], row[2])
        except sqlite3.Error:
            pass  # an unusable leftover: rebuild it
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    t0 = time.perf_counter()
    count = ignored = 0
    db = sqlite3.connect(tmp)
    try:
        # A scratch file rebuilt from scratch when lost: no journal, no fsync.
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE vecap (url TEXT NOT NULL, caption TEXT NOT NULL)")
        for file in json_files:
            batch: list[tuple[str, str]] = []
            for url, caption in iter_vecap_json(file):
                if not isinstance(caption, str):
                    ignored += 1
                    continue
                batch.append((url.strip(), caption))
                if len(batch) >= 100_000:
                    db.executemany("INSERT INTO vecap VALUES (?, ?)", batch)
                    count += len(batch)
                    batch.clear()
            db.executemany("INSERT INTO vecap VALUES (?, ?)", batch)
            count += len(batch)
        # Indexing after the inserts sorts once, much faster than a keyed insert per row.
        db.execute("CREATE INDEX vecap_url ON vecap (url)")
        distinct = db.execute("SELECT COUNT(DISTINCT url) FROM vecap").fetchone()[0]
        db.execute("CREATE TABLE meta (fingerprint TEXT, captions INTEGER, ignored INTEGER)")
        db.execute("INSERT INTO meta VALUES (?, ?, ?)", (fingerprint, distinct, ignored))
        db.commit()
    finally:
        db.close()
    os.replace(tmp, path)
    log.info(
        "VeCap index: %d captions from %d files in %.1f s",
        distinct,
        len(json_files),
        time.perf_counter() - t0,
    )
    return VecapIndexInfo(path, list(json_files), distinct, ignored)


class VecapLookup:
    """url -> caption from an index made by build_vecap_index; one per process (an SQLite connection)."""

    def __init__(self, path: str):
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def __call__(self, url: str) -> str | None:
        """The caption indexed for `url` (surrounding spaces ignored), or None."""
        # ORDER BY rowid: the first file's caption when a URL is repeated.
        row = self._db.execute(
            "SELECT caption FROM vecap WHERE url = ? ORDER BY rowid LIMIT 1", (url.strip(),)
        ).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        """Closes the connection."""
        self._db.close()
