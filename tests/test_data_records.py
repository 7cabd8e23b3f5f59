"""The shard format: round trips, versioning, and failures that name the file."""

from __future__ import annotations

import os

import msgpack
import pytest

from veclip_jax.data import records
from veclip_jax.data.records import Record, RecordFormatError


def _rec(i: int, **kw) -> Record:
    base = dict(key=f"k{i}", jpeg=bytes([i % 256]) * (i + 1), alt_text=f"alt {i}", vecap_text=f"vecap {i}")
    return Record(**(base | kw))


def test_record_roundtrip_keeps_every_field():
    rec = Record(
        key="a/1",
        jpeg=b"\xff\xd8\x00bytes",
        alt_text=None,
        vecap_text="A red circle. ünïcode ✓",
        source="cc3m",
        labels={"color": "red"},
    )
    assert records.decode_record(records.encode_record(rec)) == rec


def test_format_is_a_plain_versioned_msgpack_map():
    m = msgpack.unpackb(records.encode_record(_rec(3, alt_text=None)), raw=False)
    assert m == {"v": 1, "key": "k3", "jpeg": b"\x03" * 4, "alt_text": None, "vecap_text": "vecap 3"}


def test_absent_caption_fields_read_as_missing_and_unknown_fields_are_ignored():
    data = msgpack.packb({"v": 1, "key": "x", "jpeg": b"j", "future_field": [1, 2]}, use_bin_type=True)
    rec = records.decode_record(data)
    assert rec.alt_text is None and rec.vecap_text is None and rec.key == "x"


def test_newer_format_version_is_refused_with_a_clear_error():
    data = msgpack.packb({"v": 2, "key": "x", "jpeg": b"j"}, use_bin_type=True)
    with pytest.raises(RecordFormatError, match="version 2 is not supported"):
        records.decode_record(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01garbage",
        b"",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"key": "x", "jpeg": b"j"}, use_bin_type=True),  # no version
        msgpack.packb({"v": 1, "key": "x", "jpeg": "not bytes"}, use_bin_type=True),
        msgpack.packb({"v": 1, "key": "x", "jpeg": b"j", "alt_text": 3}, use_bin_type=True),
    ],
)
def test_malformed_bytes_raise_record_format_error(data):
    with pytest.raises(RecordFormatError):
        records.decode_record(data)


def test_reader_sees_all_shards_as_one_sequence(tmp_path):
    paths = records.write_shards((_rec(i) for i in range(10)), str(tmp_path / "train"), 3)
    assert [os.path.basename(p) for p in paths] == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
    reader = records.RecordReader(paths)
    assert len(reader) == 10
    # Round-robin: shard s holds records s, s+3, ...; the reader concatenates shards.
    assert [r.key for r in reader] == [f"k{i}" for s in range(3) for i in range(s, 10, 3)]
    assert reader[-1] == _rec(8)
    assert records.decode_record(reader.raw(0)) == _rec(0)


def test_globs_and_comma_lists_resolve_in_sorted_order(tmp_path):
    paths = records.write_shards((_rec(i) for i in range(4)), str(tmp_path / "d"), 2)
    assert records.shard_paths(str(tmp_path / "d-*.array_record")) == paths
    assert records.shard_paths(f"{paths[1]}, {paths[0]}") == [paths[1], paths[0]]


def test_brace_ranges_resolve_in_order(tmp_path):
    # What --config.data.train_files='/data/train-{00000..00001}-of-00002.array_record' goes through.
    paths = records.write_shards((_rec(i) for i in range(4)), str(tmp_path / "train"), 2)
    spec = str(tmp_path / "train-{00000..00001}-of-00002.array_record")
    assert records.shard_paths(spec) == paths
    assert records.shard_paths(f"{tmp_path}/train-{{00001..00000}}-of-00002.array_record") == paths[::-1]
    assert [r.key for r in records.RecordReader(spec)] == ["k0", "k2", "k1", "k3"]


def test_writer_leaves_no_shard_when_the_block_fails(tmp_path):
    path = tmp_path / "x.array_record"
    with pytest.raises(RuntimeError), records.RecordWriter(path) as w:
        w.write(_rec(0))
        raise RuntimeError("conversion failed")
    assert not os.listdir(tmp_path)


def test_missing_shard_fails_with_its_name(tmp_path):
    good = records.write_shards([_rec(0)], str(tmp_path / "g"), 1)[0]
    missing = str(tmp_path / "nope.array_record")
    with pytest.raises(FileNotFoundError, match="nope.array_record"):
        records.shard_paths(f"{good},{missing}")


def test_glob_matching_nothing_fails_with_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no data shards match .*zzz-\*"):
        records.shard_paths(str(tmp_path / "zzz-*"))


def test_corrupt_shard_fails_with_its_name(tmp_path):
    bad = tmp_path / "corrupt.array_record"
    bad.write_bytes(b"this is not an array record file" * 10)
    with pytest.raises(ValueError, match="corrupt.array_record"):
        records.shard_paths(str(bad))
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        records.shard_paths(str(tmp_path))


def test_writer_rejects_wrong_field_types(tmp_path):
    with records.RecordWriter(tmp_path / "t.array_record") as w, pytest.raises(TypeError, match="alt_text"):
        w.write(_rec(0, alt_text=b"bytes, not str"))
