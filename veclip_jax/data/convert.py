"""Converting raw image-text pairs into ArrayRecord training shards (format v1, records.py).

Inputs:

* img2dataset's webdataset output: tars whose samples are KEY.jpg (or .jpeg,
  .png, .webp), KEY.txt (the AltText) and KEY.json (url, status, caption).
  VeCLIP's released VeCap captions, JSON files {image_url: caption}, are
  joined by URL into `vecap_text`.
* A CSV/TSV table: an image path, the captions, optionally a key and a URL
  per row; images are read from disk.

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
import contextlib
import csv
import dataclasses
import glob
import gzip
import io
import json
import logging
import multiprocessing
import os
import re
import sqlite3
import tarfile
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from PIL import Image

from veclip_jax.data import captions, image_ops, records

try:
    import simplejpeg
except ImportError:  # PIL then checks every image
    simplejpeg = None

log = logging.getLogger(__name__)

# Part of every shard's fingerprint: bump when a change to this module changes
# which records a shard holds, so that a resume does not mix the two versions.
CONVERTER_VERSION = 1

# Why samples are skipped, in the order they are checked (a sample counts once).
SKIP_REASONS: dict[str, str] = {
    "missing_input": "an input tar that does not exist or cannot be opened (one count per tar)",
    "unreadable_input": "an input tar that is corrupt or truncated; reading it stops there (one per tar)",
    "bad_metadata": "the sample's .json is not a JSON object",
    "not_success": "the .json status is present and not 'success' (a failed img2dataset download)",
    "no_image": "no image member (webdataset) or an empty image path (table)",
    "no_caption": "neither an AltText nor a VeCap caption, after cleaning",
    "missing_file": "table: the image file does not exist or cannot be read",
    "duplicate_key": "a key already written to the same shard",
    "unreadable_image": "the image bytes do not decode",
}

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_MEMBER_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))


# --- input lists --------------------------------------------------------------------------------


def _split_top_level_commas(spec: str) -> list[str]:
    # Commas inside braces belong to a brace list ("{a,b}.tar"), not to the spec's list.
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return items


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.fullmatch(body)
    if numeric:
        a, b = numeric.groups()
        # Zero-padded bounds ("00000..00331") give zero-padded names, as in img2dataset's output.
        padded = (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0")
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = [match.group(0)]  # "{x}" is not a pattern: keep it literally
    head, rest = pattern[: match.start()], _expand_braces(pattern[match.end() :])
    return [head + option + tail for option in options for tail in rest]


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Input files from a spec: comma-separated paths, brace ranges and globs (or a list of them).

    `/data/cc3m/{00000..00331}.tar` expands to 332 names (zero-padded like its
    bounds), `{a,b}` to both, `~` to the home directory; globs are sorted and
    must match something. Plain names are kept whether or not the file exists
    (a converter counts missing ones). Duplicates are dropped, first kept.
    """
    items = _split_top_level_commas(spec) if isinstance(spec, str) else [str(s) for s in spec]
    paths: list[str] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        for pattern in _expand_braces(os.path.expanduser(item)):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise FileNotFoundError(f"no files match {pattern!r}")
                paths.extend(matches)
            else:
                paths.append(pattern)
    return list(dict.fromkeys(paths))


# --- VeCap captions: {url: caption} JSON, streamed into an on-disk index ------------------------

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
    with opener(path, "rt", encoding="utf-8-sig") as f:
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


class _VecapLookup:
    def __init__(self, path: str):
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def __call__(self, url: str) -> str | None:
        # ORDER BY rowid: the first file's caption when a URL is repeated.
        row = self._db.execute(
            "SELECT caption FROM vecap WHERE url = ? ORDER BY rowid LIMIT 1", (url.strip(),)
        ).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self._db.close()


# --- checks on one sample -----------------------------------------------------------------------


def image_decodes(data: bytes) -> bool:
    """Whether the training pipeline's decoders read `data`; cheap for JPEGs (decoded at 1/8 scale).

    Mirrors image_ops: simplejpeg (strict) first, PIL for what it refuses,
    images of more than image_ops.MAX_PIXELS pixels refused.
    """
    if not data:
        return False
    if simplejpeg is not None:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # not a JPEG simplejpeg knows: PIL decides
        else:
            if height < 1 or width < 1 or height * width > image_ops.MAX_PIXELS:
                return False
            try:
                simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=1, min_width=1)
                return True
            except ValueError:
                pass  # the pipeline falls back to PIL too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on large or odd files; the verdict is what counts
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if height < 1 or width < 1 or height * width > image_ops.MAX_PIXELS:
                    return False
                if img.format == "JPEG":
                    img.draft("RGB", (1, 1))  # smallest DCT scale: the whole stream is still read
                img.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return False


def _caption(value: Any) -> str | None:
    """The text as it is, or None when it is not a string or cleans to nothing (the loader cleans)."""
    if not isinstance(value, str) or not captions.clean_caption(value):
        return None
    return value


# --- shard jobs ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TableColumns:
    """Column names of a CSV/TSV table. Only `image` is required; key and URL are optional."""

    image: str = "image"
    alt_text: str = "alt_text"
    vecap_text: str = "vecap_text"
    key: str = "key"
    url: str = "url"


@dataclasses.dataclass(frozen=True)
class _Row:
    key: str
    image: str  # absolute path, or "" when the row has none
    alt_text: str | None
    vecap_text: str | None
    url: str | None


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything one worker needs to write one output shard (pickled to spawned workers)."""

    path: str
    stats_path: str
    fingerprint: dict[str, Any]
    tars: tuple[str, ...] = ()
    rows: tuple[_Row, ...] = ()
    vecap_index: str | None = None
    source: str | None = None
    verify_images: bool = True


@dataclasses.dataclass
class _Candidate:
    record: records.Record
    vecap_joined: bool  # vecap_text came from the VeCap JSON


def _split_member(name: str) -> tuple[str, str]:
    # The webdataset convention: the key is the path up to the first dot of the basename.
    directory, _, base = name.removeprefix("./").rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]] | str]:
    """(key, {extension: bytes}) per sample of a tar, or a skip reason for the tar itself."""
    try:
        tar = tarfile.open(path, mode="r|*")  # a stream: tars are read once, front to back
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        yield "missing_input"
        return
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        yield "unreadable_input"
        return
    key, members = None, {}
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                if ext in _MEMBER_EXTENSIONS and ext not in members:
                    members[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        # The sample being read when the damage showed is incomplete: dropped with the rest.
        yield "unreadable_input"
        return
    if key is not None:
        yield key, members


# A candidate record, or the reason it was skipped; with where it came from (a tar or an image file).
_Outcome = tuple[_Candidate | str, str]


def _webdataset_outcomes(job: _Job, lookup: _VecapLookup | None) -> Iterator[_Outcome]:
    for tar in job.tars:
        for sample in _tar_samples(tar):
            if isinstance(sample, str):
                yield sample, tar
            else:
                yield _webdataset_candidate(*sample, lookup, job.source), tar


def _webdataset_candidate(
    key: str, members: Mapping[str, bytes], lookup: _VecapLookup | None, source: str | None
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


def _table_outcomes(job: _Job, lookup: _VecapLookup | None) -> Iterator[_Outcome]:
    for row in job.rows:
        yield _table_candidate(row, lookup, job.source), row.image


def _table_candidate(row: _Row, lookup: _VecapLookup | None, source: str | None) -> _Candidate | str:
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


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a stats file is either complete or absent


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
    lookup = _VecapLookup(job.vecap_index) if job.vecap_index else None
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
    _write_json(job.stats_path, stats)
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
    _write_json(summary.stats_path, summary.to_dict())
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


def _read_table(
    path: str, columns: TableColumns, image_root: str, delimiter: str, has_vecap_json: bool
) -> list[_Row]:
    # The whole table is read here, once, rather than by every worker: workers get their rows.
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
                _Row(
                    key=(cell(row, "key") or "").strip() or str(r),
                    image=image,
                    alt_text=cell(row, "alt_text"),
                    vecap_text=cell(row, "vecap_text"),
                    url=(cell(row, "url") or "").strip() or None,
                )
            )
    return rows


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
    rows = _read_table(table, columns, root, delimiter, bool(vecap_files))
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
