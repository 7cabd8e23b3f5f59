"""Image-text records in ArrayRecord shards: the on-disk format, a writer and a reader.

One ArrayRecord record is one image-text pair, serialised as a msgpack map
(format version 1; the full description is in veclip_jax/data/README.md):

    {"v": 1,                   # format version, an int; readers refuse newer versions
     "key": str,               # unique id of the pair (e.g. the image URL's hash)
     "jpeg": bytes,            # the encoded image (JPEG; PNG/WebP/... also decode, via PIL)
     "alt_text": str | nil,    # the web AltText; nil or absent when missing
     "vecap_text": str | nil,  # the visual-enriched caption (VeCap); nil or absent when missing
     "source": str,            # optional: the corpus the pair comes from
     "labels": {str: str}}     # optional: attribute labels (evaluation splits)

msgpack rather than pickle because the shards outlive the code: any language
reads them, and no class path is baked in. Keys a reader does not know are
ignored, so a later version 1 writer may add optional fields; a change that
an old reader would misread bumps "v".

Shards are written with ArrayRecord option "group_size:1" so that any record
can be read on its own (grain reads records in a random order).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType

import msgpack
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from veclip_jax.data.paths import expand_paths
from veclip_jax.errors import UserError

FORMAT_VERSION = 1
# group_size:1 makes every record its own chunk: random access costs one read.
ARRAY_RECORD_OPTIONS = "group_size:1"
SHARD_SUFFIX = ".array_record"


class RecordFormatError(ValueError):
    """Bytes that are not a record of a format version this reader knows."""


class ShardError(UserError, ValueError):
    """A data shard the user named that is not a readable ArrayRecord file, or no shard at all: exit 2."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One image-text pair. Either caption may be None (missing)."""

    key: str
    jpeg: bytes
    alt_text: str | None = None
    vecap_text: str | None = None
    source: str | None = None
    labels: Mapping[str, str] | None = None


def encode_record(record: Record) -> bytes:
    """Serialises a record (format version FORMAT_VERSION)."""
    if not isinstance(record.key, str):
        raise TypeError(f"record key must be str, got {type(record.key).__name__}")
    if not isinstance(record.jpeg, bytes | bytearray | memoryview):
        raise TypeError(f"record {record.key!r}: jpeg must be bytes, got {type(record.jpeg).__name__}")
    for name in ("alt_text", "vecap_text", "source"):
        value = getattr(record, name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"record {record.key!r}: {name} must be str or None, got {type(value).__name__}")
    m: dict = {
        "v": FORMAT_VERSION,
        "key": record.key,
        "jpeg": bytes(record.jpeg),
        "alt_text": record.alt_text,
        "vecap_text": record.vecap_text,
    }
    if record.source is not None:
        m["source"] = record.source
    if record.labels is not None:
        m["labels"] = {str(k): str(v) for k, v in record.labels.items()}
    return msgpack.packb(m, use_bin_type=True)


def _optional_str(m: dict, name: str) -> str | None:
    value = m.get(name)
    if value is not None and not isinstance(value, str):
        raise RecordFormatError(f"field {name!r} is {type(value).__name__}, expected str or nil")
    return value


def decode_record(data: bytes) -> Record:
    """Parses one serialised record; raises RecordFormatError if it is not one."""
    try:
        m = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise RecordFormatError(f"not a msgpack record: {type(e).__name__}: {e}") from e
    if not isinstance(m, dict):
        raise RecordFormatError(f"record is a msgpack {type(m).__name__}, expected a map")
    version = m.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RecordFormatError(f"record has no integer format version 'v' (got {version!r})")
    if version > FORMAT_VERSION or version < 1:
        raise RecordFormatError(
            f"record format version {version} is not supported (this reader knows 1..{FORMAT_VERSION}); "
            "upgrade veclip-jax to read these shards"
        )
    key, jpeg = m.get("key"), m.get("jpeg")
    if not isinstance(key, str):
        raise RecordFormatError(f"field 'key' is {type(key).__name__}, expected str")
    if not isinstance(jpeg, bytes):
        raise RecordFormatError(f"record {key!r}: field 'jpeg' is {type(jpeg).__name__}, expected bytes")
    labels = m.get("labels")
    if labels is not None and not (
        isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        raise RecordFormatError(f"record {key!r}: field 'labels' must map str to str")
    return Record(
        key=key,
        jpeg=jpeg,
        alt_text=_optional_str(m, "alt_text"),
        vecap_text=_optional_str(m, "vecap_text"),
        source=_optional_str(m, "source"),
        labels=labels,
    )


class RecordWriter:
    """Writes records to one ArrayRecord shard. Use as a context manager.

    The shard is written to `path + ".tmp"` and renamed on a clean close, so a
    crashed conversion never leaves a truncated shard under the final name.
    """

    def __init__(self, path: str | os.PathLike, *, options: str = ARRAY_RECORD_OPTIONS):
        self.path = os.fspath(path)
        self._tmp = self.path + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._writer: ArrayRecordWriter | None = ArrayRecordWriter(self._tmp, options)
        self.count = 0

    def write(self, record: Record) -> None:
        """Appends one record."""
        if self._writer is None:
            raise ValueError(f"writer for {self.path} is closed")
        data = encode_record(record)
        try:
            self._writer.write(data)
        except RuntimeError as e:
            raise _io_error(self._tmp, e) from e
        self.count += 1

    def close(self) -> None:
        """Finishes the shard and moves it to its final name."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            try:
                writer.close()  # flushes the last chunks: where a full disk shows
            except RuntimeError as e:
                raise _io_error(self._tmp, e) from e
            os.replace(self._tmp, self.path)
        except BaseException:
            _remove_quietly(self._tmp)
            raise

    def abort(self) -> None:
        """Drops the partial shard (also when closing it fails, as it does on a full disk)."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            with contextlib.suppress(Exception):  # the shard is dropped anyway: the caller's error matters
                writer.close()
        finally:
            _remove_quietly(self._tmp)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _io_error(path: str, e: RuntimeError) -> OSError:
    """ArrayRecord reports a failed write (a full disk) as RuntimeError: an OSError, as for any file."""
    code = errno.ENOSPC if "No space left" in str(e) else errno.EIO
    return OSError(code, f"{os.strerror(code)}: writing {path} ({e})")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def shard_name(prefix: str, index: int, count: int) -> str:
    """The conventional shard file name: PREFIX-00003-of-00016.array_record."""
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def write_shards(records: Iterable[Record], prefix: str, num_shards: int) -> list[str]:
    """Writes records round-robin over `num_shards` shards; returns their paths.

    Round-robin rather than contiguous blocks: the total need not be known in
    advance, and every shard gets a similar mix of the input's order.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    paths = [shard_name(prefix, i, num_shards) for i in range(num_shards)]
    writers = [RecordWriter(p) for p in paths]
    try:
        for i, record in enumerate(records):
            writers[i % num_shards].write(record)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        w.close()
    return paths


def _check_shard(path: str) -> int:
    """Number of records in an ArrayRecord shard; a clear error naming it if unusable."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data shard not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"data shard is a directory, not an ArrayRecord file: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"data shard is not readable: {path}")
    # ArrayRecordReader does not raise on a bad file; it reports through ok().
    try:
        reader = ArrayRecordReader(path)
        if reader.ok():
            n = reader.num_records()
            reader.close()
            return n
        status = "bad header"
    except Exception as e:  # close() of a bad file raises, as may open()
        status = f"{type(e).__name__}: {e}"
    raise ShardError(f"data shard is not a readable ArrayRecord file: {path} ({status})")


def shard_counts(spec: str | Sequence[str]) -> list[tuple[str, int]]:
    """(path, record count) of every shard of a path spec (paths.expand_paths: comma lists, ranges, globs).

    Every file is opened once, so a missing, unreadable or corrupt shard fails
    here, by name, rather than mid-run.
    """
    paths = expand_paths(spec, what="data shards")
    if not paths:
        raise ShardError("no data shards given")
    return [(p, _check_shard(p)) for p in paths]


def shard_paths(spec: str | Sequence[str]) -> list[str]:
    """The shard paths of a path spec, each checked as in `shard_counts`."""
    return [p for p, _ in shard_counts(spec)]


class RecordReader(Sequence[Record]):
    """Random access to the records of one or more shards, as one sequence.

    Index i counts through the shards in the order given. `raw(i)` returns the
    serialised bytes (what the grain pipeline reads); `[i]` the parsed Record.
    A record whose bytes the shard cannot give back (a damaged chunk: "chunk
    data hash mismatch") raises RecordFormatError naming the shard and the
    record's place in it, like a record that does not parse: either way the
    record is bad, and the caller decides whether that is fatal. Picklable
    (grain's worker processes get a copy).
    """

    def __init__(self, spec: str | Sequence[str]):
        # Imported here: writing shards should not need grain.
        import grain

        counted = shard_counts(spec)
        self.paths = [p for p, _ in counted]
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        self._starts = [0, *itertools.accumulate(n for _, n in counted[:-1])]  # shard after shard

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, index within that shard) of record `index`."""
        shard = bisect.bisect_right(self._starts, index) - 1
        return self.paths[shard], index - self._starts[shard]

    @property
    def source(self):
        """The grain ArrayRecordDataSource over all shards (items are bytes)."""
        return self._source

    def __len__(self) -> int:
        return len(self._source)

    def raw(self, index: int) -> bytes:
        """The serialised record at `index`; RecordFormatError, naming the shard, if it cannot be read."""
        try:
            return self._source[index]
        except Exception as e:  # ArrayRecord raises RuntimeError on damaged chunks
            path, local = self.locate(index)
            raise RecordFormatError(
                f"record {local} of shard {path} (index {index}) cannot be read: {type(e).__name__}: {e}"
            ) from e

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        return decode_record(self.raw(index))

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]
