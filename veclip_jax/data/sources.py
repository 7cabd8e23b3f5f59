"""Training sources: the corpora `config.data` names, as grain datasets of `Item`s.

A source is one corpus: its files (one format, told by the extension), a
mixing weight, and its caption policy (which field is the AltText, which the
VeCap caption, and its `vecap_prob`). `config.data.train_files` alone is the
one-source case (it keeps config.seed, so its draws are those of earlier
versions); `config.data.sources` names several:

    config.data.sources = {
        "dfn": dict(files="/data/dfn/{00000..01023}.tar", weight=0.5),           # AltTexts only
        "vecap": dict(files="/data/vecap/train-*.array_record", weight=0.5, vecap_prob=0.5),
    }

Formats:

    .array_record  records.py's shards: random access, so a global shuffle per
                   epoch and a position per example (exact, layout-free resume)
    .tar           img2dataset's WebDataset tars (KEY.jpg/.png/.webp, KEY.txt, KEY.json), streamed
    .parquet       tables with an image-bytes column and caption columns (pyarrow), streamed

Each source's randomness (file and record order, each example's crop and
caption draw) is seeded by `source_seed(config.seed, name)`: a function of the
run's seed and the source's own name, never of the other sources, so adding a
corpus does not change another's draws.

An `Item` is one example's coordinates: (source, epoch, index) and, for the
streamed formats, the raw sample read from the file (for ArrayRecord the
record is read later, in a reader thread, from the index). `index` is the
record index for ArrayRecord, and `file_index * 2**32 + sample_index` for the
streamed formats (the example's place in its file, whatever reads it).

The streams of a reader lane (tar and Parquet files, one at a time, with a
resumable position) are in data/lane_streams.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import grain

from veclip_jax.data import records, seeds
from veclip_jax.data.paths import expand_paths
from veclip_jax.errors import UserError

if TYPE_CHECKING:
    import ml_collections

ARRAY_RECORD, WEBDATASET, PARQUET = "array_record", "webdataset", "parquet"
# Told by the file name's extension (case-insensitive).
FORMAT_OF_EXTENSION = {".array_record": ARRAY_RECORD, ".tar": WEBDATASET, ".parquet": PARQUET}
# "" in a *_field means the format's default; "none" ignores that caption.
DEFAULT_FIELDS = {
    # (alt_text_field, vecap_text_field, image_field)
    ARRAY_RECORD: ("alt_text", "vecap_text", "jpeg"),
    WEBDATASET: ("txt", "none", ""),  # image: the first .jpg/.jpeg/.png/.webp member
    PARQUET: ("caption", "none", ""),  # image: the first of readers/parquet.py IMAGE_COLUMNS
}
SAMPLE_BITS = 32  # streamed formats: index = file_index << SAMPLE_BITS | sample index in the file


class SourceError(UserError, ValueError):
    """A source of config.data that cannot be read as configured (named in the message): exit 2."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One training corpus, resolved: plain values, pickled to worker processes."""

    name: str  # "" for the one source of data.train_files
    index: int  # its place in the mixture (the order of config.data.sources)
    format: str
    files: tuple[str, ...]
    weight: float
    vecap_prob: float
    alt_text_field: str
    vecap_text_field: str
    image_field: str
    seed: int  # the base of every random draw of this source
    num_records: int = 0  # ArrayRecord: records over all its shards; streamed formats: 0 (unknown)

    @property
    def label(self) -> str:
        """How logs and errors name the source."""
        return f"data.sources.{self.name}" if self.name else "data.train_files"

    @property
    def streamed(self) -> bool:
        return self.format != ARRAY_RECORD


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One example's coordinates (and, for streamed formats, its raw sample)."""

    source: int
    epoch: int
    index: int
    payload: Any = None  # webdataset: {extension: bytes}; parquet: {column: value}; ArrayRecord: None
    position: int = -1  # ArrayRecord pipelines: the example's place in this process's stream


@dataclasses.dataclass(frozen=True, slots=True)
class Skipped:
    """Stands in for an example that could not be used; the batcher counts it by source and reason."""

    reason: str
    source: int = 0
    position: int = -1


def source_seed(seed: int, name: str) -> int:
    """The seed of source `name`: config.seed for the unnamed source, else a hash of (seed, name)."""
    if not name:
        return int(seed)
    return seeds.example_seed(int(seed), seeds.STREAM_SOURCE, *name.encode())


def format_of(files: list[str], label: str) -> str:
    """The one format of a source's files, from their extensions; SourceError if mixed or unknown."""
    found = {}
    for f in files:
        ext = next((e for e in FORMAT_OF_EXTENSION if f.lower().endswith(e)), None)
        if ext is None:
            raise SourceError(
                f"{label}: cannot tell the format of {f} from its extension "
                f"(known: {', '.join(FORMAT_OF_EXTENSION)})"
            )
        found.setdefault(FORMAT_OF_EXTENSION[ext], f)
    if len(found) > 1:
        raise SourceError(f"{label}: one source holds one format, got {', '.join(found.values())}")
    return next(iter(found))


def _check_stream_file(path: str, label: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{label}: file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{label}: a directory, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{label}: file not readable: {path}")


def _resolve(
    name: str,
    index: int,
    files_spec: str,
    weight: float,
    vecap_prob: float,
    fields: tuple[str, str, str],
    seed: int,
) -> SourceSpec:
    label = f"data.sources.{name}" if name else "data.train_files"
    try:
        files = expand_paths(files_spec, what=f"{label} files")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{label}: {e}") from None
    if not files:
        raise SourceError(f"{label}: no files given")
    fmt = format_of(files, label)
    num_records = 0
    if fmt == ARRAY_RECORD:
        counted = records.shard_counts(files)  # opens each shard: a bad one fails here, by name
        num_records = sum(n for _, n in counted)
        if num_records == 0:
            raise SourceError(f"{label}: the shards hold no records: {files_spec}")
    else:
        for f in files:
            _check_stream_file(f, label)
    defaults = DEFAULT_FIELDS[fmt]
    alt, vecap, image = (given or default for given, default in zip(fields, defaults, strict=True))
    if fmt == ARRAY_RECORD:
        for field, value in (("alt_text_field", alt), ("vecap_text_field", vecap)):
            if value not in ("alt_text", "vecap_text", "none"):
                raise SourceError(
                    f"{label}.{field}={value!r}: ArrayRecord sources take alt_text, vecap_text or none"
                )
    return SourceSpec(
        name=name,
        index=index,
        format=fmt,
        files=tuple(files),
        weight=float(weight),
        vecap_prob=float(vecap_prob),
        alt_text_field=alt,
        vecap_text_field=vecap,
        image_field=image,
        seed=source_seed(seed, name),
        num_records=num_records,
    )


def resolve_source_specs(
    config: ml_collections.ConfigDict, demo_files: list[str] | None = None
) -> list[SourceSpec]:
    """The sources of `config.data`: its named `sources`, else `train_files` (or the demo shards) as one.

    Every file is checked here (shards opened, streamed files found), so a
    wrong path fails before any work, naming the source and the file.
    """
    d = config.data
    seed = int(config.seed)
    named = dict(d.get("sources") or {})
    if not named:
        spec = d.train_files or ",".join(demo_files or [])
        return [_resolve("", 0, spec, 1.0, float(d.vecap_prob), ("", "", ""), seed)]
    specs = []
    for i, (name, s) in enumerate(named.items()):
        prob = float(s.get("vecap_prob", -1.0))
        specs.append(
            _resolve(
                str(name),
                i,
                s.get("files", ""),
                float(s.get("weight", 1.0)),
                float(d.vecap_prob) if prob < 0 else prob,
                (s.get("alt_text_field", ""), s.get("vecap_text_field", ""), s.get("image_field", "")),
                seed,
            )
        )
    return specs


# --- ArrayRecord: descriptors of (source, epoch, record index), read later ------------------------


class _Describe(grain.transforms.MapWithIndex):
    """(position in a repeated, shuffled range, record or file index) -> Item(source, epoch, index)."""

    def __init__(self, source: int, count: int):
        self.source, self.count = source, count

    def map_with_index(self, position: int, index: int) -> Item:
        return Item(self.source, position // self.count, int(index))


def shuffle_seed(seed: int) -> int:
    """grain's shuffle seed for a source seed (hashed: grain reshuffles epoch e with seed + e)."""
    return seeds.example_seed(seed, seeds.STREAM_SHUFFLE) % 2**32


def epoch_stream(source: int, count: int, seed: int) -> grain.MapDataset:
    """Item(source, epoch, i) for i in a fresh permutation of range(count) per epoch, forever."""
    return (
        grain.MapDataset.range(count)
        .shuffle(seed=shuffle_seed(seed))
        .repeat(None)
        .map_with_index(_Describe(source, count))
    )
