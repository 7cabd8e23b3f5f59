"""Decompression bombs (issue 22 #6): each is refused or bounded before its expanded size is allocated.

Bounds are monkeypatched down where the real bomb would take gigabytes; the
16-bit PNG and the 1x200000 PNG are the real files (small on disk), checked
for time and memory.
"""

from __future__ import annotations

import io
import struct
import tarfile
import time
import tracemalloc
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from veclip_jax.data import image_ops, lane_streams
from veclip_jax.data.image_ops import EvalPreprocess, ImageDecodeError
from veclip_jax.data.readers import parquet as parquet_reader
from veclip_jax.data.readers import webdataset
from veclip_jax.data.readers.table import TableColumns


def _png_bytes(img: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, **pax: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if pax:
        info.pax_headers = pax
    tar.addfile(info, io.BytesIO(data))


def _tar(path, members: list[tuple[str, bytes]], mode: str = "w:gz") -> str:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return str(path)


# --- (a) tar members --------------------------------------------------------------------------------


def test_a_tar_member_over_the_bound_is_skipped_unread_and_the_tar_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(webdataset, "MAX_MEMBER_BYTES", 4096)
    big = bytes(1 << 20)  # 1 MiB of zeros: ~1 KB gzip-compressed
    path = _tar(
        tmp_path / "bomb.tar.gz",
        [
            ("a.jpg", b"small"),
            ("a.txt", b"first"),
            ("b.txt", b"caption"),
            ("b.jpg", big),  # the bomb: its sample is skipped
            ("b.json", b"{}"),
            ("c.jpg", b"img"),
            ("c.txt", b"third"),
        ],
    )
    read = []
    real = tarfile.TarFile.extractfile

    def extractfile(self, member):
        read.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    out = list(webdataset.iter_tar_samples(path))
    assert out == [
        ("a", {"jpg": b"small", "txt": b"first"}),
        "bad_record",
        ("c", {"jpg": b"img", "txt": b"third"}),
    ]
    assert "b.jpg" not in read and "b.json" not in read  # never read: the header's size decided
    # The trainer's lane counts the one sample and reads on (not the whole tar as unreadable).
    assert list(lane_streams._tar_items(path)) == [
        {"jpg": b"small", "txt": b"first"},
        "bad_record",
        {"jpg": b"img", "txt": b"third"},
    ]


def test_a_member_at_the_bound_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(webdataset, "MAX_MEMBER_BYTES", 4096)
    path = _tar(tmp_path / "ok.tar", [("a.jpg", bytes(4096)), ("a.txt", b"x")], mode="w")
    assert list(webdataset.iter_tar_samples(path)) == [("a", {"jpg": bytes(4096), "txt": b"x"})]


def test_a_huge_pax_header_is_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(webdataset, "_MAX_HEADER_BYTES", 4096)
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "a.txt", b"fine")
        _add(tar, "b.txt", b"dropped")  # the sample being read when the damage shows, as in a damaged tar
        _add(tar, "c.txt", b"x", comment="z" * 100_000)
    assert list(webdataset.iter_tar_samples(str(path))) == [("a", {"txt": b"fine"}), "unreadable_file"]
    assert list(lane_streams._tar_items(str(path))) == [{"txt": b"fine"}, "unreadable_file"]


# --- (b) Parquet row groups -------------------------------------------------------------------------


def _parquet(path, n: int = 8, value: bytes = b"\xff\xd8jpeg", **kw) -> str:
    pq.write_table(
        pa.table({"jpg": pa.array([value] * n, pa.binary()), "caption": [f"c{i}" for i in range(n)]}),
        path,
        **kw,
    )
    return str(path)


def test_b_a_row_group_over_the_bound_skips_the_file_before_a_row_is_read(tmp_path, monkeypatch):
    path = _parquet(tmp_path / "big.parquet", n=64, value=bytes(range(256)) * 4, row_group_size=32)
    size = pq.ParquetFile(path).metadata.row_group(1).column(0).total_uncompressed_size
    monkeypatch.setattr(parquet_reader, "MAX_ROW_GROUP_BYTES", size)  # the captions tip it over
    iter_batches = pq.ParquetFile.iter_batches

    def no_read(*a, **k):
        raise AssertionError("a row group was read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_read)
    assert list(parquet_reader.iter_parquet_rows(path, TableColumns(), "")) == ["unreadable_file"]
    assert list(lane_streams._parquet_items(path)) == ["unreadable_file"]
    # Under the bound the same file reads whole, both ways.
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    monkeypatch.setattr(parquet_reader, "MAX_ROW_GROUP_BYTES", 10 * size)
    assert len(list(parquet_reader.iter_parquet_rows(path, TableColumns(), ""))) == 64
    rows = list(lane_streams._parquet_items(path))
    assert len(rows) == 64 and rows[5] == {"jpg": bytes(range(256)) * 4, "caption": "c5"}


def test_b_dictionary_encoding_cannot_expand_a_row_group_past_the_batch_budget(tmp_path, monkeypatch):
    # 200 rows of one 1 MiB value: a file of about 1 KB whose metadata says ~1 MiB, 200 MiB decoded.
    path = _parquet(tmp_path / "dict.parquet", n=200, value=bytes(1 << 20), compression="zstd")
    assert (tmp_path / "dict.parquet").stat().st_size < 4096
    monkeypatch.setattr(parquet_reader, "_BATCH_BYTES", 4 << 20)
    batches = list(parquet_reader.bounded_batches(path))
    assert sum(b.num_rows for b in batches) == 200
    assert max(b.nbytes for b in batches) <= (4 << 20) + 4096
    tracemalloc.start()
    try:
        n = sum(1 for _ in lane_streams._parquet_items(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 200 and peak < 32 << 20  # rows as Python bytes: a batch of them at a time, not 200 MiB


# --- (c) decode budget in bytes, 16-bit conversion ---------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _gray16_png_zeros(width: int, height: int) -> bytes:
    """A width x height 16-bit grayscale PNG of zeros, written row by row (never held whole)."""
    z = zlib.compressobj(9)
    row = bytes(1 + 2 * width)  # filter byte 0, then zeros
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def png16_bomb() -> bytes:
    return _gray16_png_zeros(13000, 13000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_c_a_16_bit_png_bomb_is_refused_from_its_header(png16_bomb):
    assert len(png16_bomb) < 1 << 20  # a few hundred KB on disk, 338 MB of 16-bit pixels
    assert 13000 * 13000 <= image_ops.MAX_PIXELS  # today's pixel cap lets it through
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="bytes"):
            image_ops.decode_random_crop(png16_bomb, rng, size=32, scale=(0.5, 1.0), ratio=(0.75, 1.33))
        assert not image_ops.image_decodes(png16_bomb)
        with Image.open(io.BytesIO(png16_bomb)) as img, pytest.raises(ImageDecodeError):
            EvalPreprocess(32, 32)(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0 and peak < 16 << 20


def test_c_the_budget_counts_bytes_per_pixel_of_the_mode(monkeypatch):
    assert image_ops.decoded_bytes("I;16", 10, 10) == 200
    assert image_ops.decoded_bytes("RGB", 10, 10) == 300
    assert image_ops.decoded_bytes("L", 10, 10) == 100
    assert image_ops.decoded_bytes("F", 10, 10) == 400
    monkeypatch.setattr(image_ops, "MAX_DECODE_BYTES", 64 * 64 * 2 - 1)
    gray8 = _png_bytes(np.zeros((64, 64), np.uint8))
    gray16 = _png_bytes(Image.fromarray(np.zeros((64, 64), np.uint16)))
    assert image_ops.image_decodes(gray8) and not image_ops.image_decodes(gray16)
    rng = np.random.default_rng(0)
    image_ops.decode_random_crop(gray8, rng, size=16, scale=(0.5, 1.0), ratio=(0.75, 1.33))
    with pytest.raises(ImageDecodeError):
        image_ops.decode_random_crop(gray16, rng, size=16, scale=(0.5, 1.0), ratio=(0.75, 1.33))


def test_c_16_bit_conversion_values_and_no_int64_temporaries():
    a = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    want = np.rint(a.astype(np.float64) / 257).astype(np.uint8)
    got = np.asarray(image_ops.to_rgb(Image.fromarray(a)))
    np.testing.assert_array_equal(got[..., 0], want)
    # Mode I (32-bit): clipped to the 16-bit range first.
    i32 = np.array([[-5, 0, 257, 65535, 70000]], np.int32)
    got = np.asarray(image_ops.to_rgb(Image.fromarray(i32)))[..., 0]
    np.testing.assert_array_equal(got, [[0, 0, 1, 255, 255]])
    # Memory: a 2048x2048 16-bit image (8 MiB) converts with temporaries of a chunk, not 4 int64 copies.
    img = Image.fromarray(np.full((2048, 2048), 40000, np.uint16))
    tracemalloc.start()
    try:
        out = image_ops.to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.asarray(out)[0, 0, 0] == 156
    assert peak < 24 << 20  # np.asarray(img) alone takes 16 MiB; the int64 path peaked at 68 MiB


# --- (d) elongated images in evaluation --------------------------------------------------------------


@pytest.mark.parametrize("method", ["bicubic", "bilinear", "tf_bilinear"])
def test_d_a_1x200000_png_evaluates_in_small_memory(method):
    data = _png_bytes(np.full((200_000, 1), 200, np.uint8))
    assert len(data) < 2048
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        with Image.open(io.BytesIO(data)) as img:
            out = EvalPreprocess(32, 32, method)(img)
        if method == "bicubic":
            assert image_ops.resize_center_crop(Image.open(io.BytesIO(data)), 32).shape == (32, 32, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (32, 32, 3) and out.dtype == (np.float32 if method == "tf_bilinear" else np.uint8)
    np.testing.assert_allclose(out[16, 16], 200, atol=0.5)  # pixels: the model normalises them
    assert peak < 32 << 20, peak  # was ~4.4 GB: the whole 32 x 6.4M image, as float32
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_d_the_cropped_resize_of_an_elongated_image_matches_the_full_one(method):
    rng = np.random.default_rng(0)
    for shape in [(300, 20, 3), (17, 250, 3)]:
        arr = (rng.random(shape) * 255).astype(np.uint8)
        pre = EvalPreprocess(16, 12, method)
        got = pre._cropped(arr)  # over MAX_EVAL_ASPECT: the box path
        resample = Image.Resampling.BICUBIC if method == "bicubic" else Image.Resampling.BILINEAR
        h, w = shape[:2]
        new_w, new_h = image_ops._shorter_side_dims(w, h, 16)
        full = np.asarray(Image.fromarray(arr).resize((new_w, new_h), resample))
        top, left = (new_h - 12) // 2, (new_w - 12) // 2
        want = full[top : top + 12, left : left + 12]
        assert max(new_w, new_h) > image_ops.MAX_EVAL_ASPECT * 16
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_d_tf_bilinear_window_is_exactly_the_crop_of_the_full_resize():
    rng = np.random.default_rng(1)
    arr = (rng.random((37, 300, 3)) * 255).astype(np.uint8)
    full = image_ops.bilinear_resize(arr, 24, 195)
    part = image_ops.bilinear_resize(arr, 24, 195, window=(2, 80, 20, 20))
    np.testing.assert_array_equal(part, full[2:22, 80:100])
    # And EvalPreprocess's tf path is the centre crop of the full resize, to the bit.
    got = EvalPreprocess(24, 20, "tf_bilinear")._cropped(arr)
    new_w = int(np.round(np.float32(24) / np.float32(37) * np.float32(300)))
    full = image_ops.bilinear_resize(arr, 24, new_w)
    left = (new_w - 20) // 2
    np.testing.assert_array_equal(got, full[2:22, left : left + 20])


def test_a_the_converter_counts_the_oversized_sample_and_converts_the_rest(tmp_path, monkeypatch):
    from veclip_jax.data import convert

    monkeypatch.setattr(webdataset, "MAX_MEMBER_BYTES", 4096)
    good = _png_bytes(np.full((8, 8, 3), 100, np.uint8))
    path = _tar(
        tmp_path / "t.tar.gz",
        [("a.png", good), ("a.txt", b"one"), ("b.png", bytes(1 << 16)), ("b.txt", b"two")],
    )
    summary = convert.convert_webdataset(path, str(tmp_path / "o"), 1)
    assert summary.records == 1 and summary.skipped == {"bad_record": 1}
