"""Fast evaluation decoding (EvalPreprocess(fast=True), `launch/eval.py --fast_decode`): HF's arithmetic
(shorter side to S, centre crop), a JPEG decoded at reduced DCT scale and torch's resize; near the exact
pixels, never confused with them (the default stays exact)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from veclip_jax.bench import input as bench_input
from veclip_jax.data import image_ops, seeds
from veclip_jax.eval.datasets import load_image


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _jpeg(h: int, w: int, i: int = 0) -> bytes:
    return bench_input._photo_jpeg(seeds.example_rng(3, i), h=h, w=w)


@pytest.mark.parametrize(
    "h, w, size, scaled, min_psnr",
    [
        (120, 160, 64, None, 60.0),  # 85x64 needs more than 4/8 (80x60): a full-size decode
        (384, 512, 64, (96, 128), 38.0),  # 2/8 covers 85x64
        (768, 1024, 224, (288, 384), 38.0),  # 3/8, as the README's photos
        (750, 1000, 224, (282, 375), 38.0),  # 3/8, whose own HF size would be 297 wide, not 298
        (517, 333, 224, None, 60.0),  # portrait, 5/8-7/8 would be needed: full size
    ],
)
def test_fast_is_hfs_arithmetic_near_the_exact_pixels(h, w, size, scaled, min_psnr):
    exact = image_ops.EvalPreprocess(size, size)
    fast = image_ops.EvalPreprocess(size, size, fast=True)
    new_w, new_h = image_ops._shorter_side_dims(w, h, size)
    assert image_ops._jpeg_decode_size(new_h, new_w, h, w, image_ops._SLOW_SCALES_TORCH) == scaled
    for i in range(3):
        data = _jpeg(h, w, i)
        want = exact(load_image(data))
        got = fast.load(data)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"]
        # Full-size decode: torch's kernel is PIL's filter to the rounding (measured max difference 1,
        # 71-73 dB); DCT-scaled: 46-50 dB measured. A crop window off by a pixel, or the resize of
        # the decoded size instead of HF's, gives under 30 dB on these noisy photos.
        assert _psnr(got, want) >= min_psnr, i
        if scaled is None:
            assert np.abs(got.astype(int) - want).max() <= 2


def test_fast_takes_paths_pngs_pil_images_arrays_and_greyscale(tmp_path):
    size = 48
    exact = image_ops.EvalPreprocess(size, size)
    fast = image_ops.EvalPreprocess(size, size, fast=True)
    rgb = simplejpeg.decode_jpeg(_jpeg(90, 130), colorspace="RGB")
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    (tmp_path / "a.jpg").write_bytes(_jpeg(90, 130))
    grey = rgb[..., 0]
    cases = [
        (png.getvalue(), exact(load_image(png.getvalue()))),  # not a JPEG: PIL decodes, torch resizes
        (str(tmp_path / "a.jpg"), exact(load_image(str(tmp_path / "a.jpg")))),  # a file path
        (Image.fromarray(rgb), exact(Image.fromarray(rgb))),
        (rgb, exact(rgb)),
        (grey, exact(load_image(grey))),
    ]
    for image, want in cases:
        got = fast.load(image)
        assert got.shape == (size, size, 3) and np.abs(got.astype(int) - want).max() <= 2
        np.testing.assert_array_equal(fast(load_image(image)), fast.load(load_image(image)))


def test_an_elongated_image_and_a_missing_torch_take_the_exact_path(monkeypatch):
    fast = image_ops.EvalPreprocess(16, 16, fast=True)
    exact = image_ops.EvalPreprocess(16, 16)
    long = _jpeg(40, 400)  # resized 160x16: over MAX_EVAL_ASPECT, only the crop's region is resized
    np.testing.assert_array_equal(fast.load(long), exact(load_image(long)))
    monkeypatch.setattr(image_ops, "_torch", False)  # as _torch_or_none leaves it without torch
    square = _jpeg(64, 64)
    np.testing.assert_array_equal(fast.load(square), exact(load_image(square)))


def test_fast_is_bicubic_only_and_off_by_default():
    assert not image_ops.EvalPreprocess(8, 8).fast
    with pytest.raises(ValueError, match="bicubic"):
        image_ops.EvalPreprocess(8, 8, "tf_bilinear", fast=True)
    with pytest.raises(ValueError, match="bicubic"):
        image_ops.EvalPreprocess(8, 8, "bilinear", fast=True)


def test_a_corrupt_jpeg_is_an_image_decode_error_in_fast_mode_too():
    fast = image_ops.EvalPreprocess(16, 16, fast=True)
    data = _jpeg(64, 64)
    with pytest.raises((image_ops.ImageDecodeError, OSError, ValueError)):
        fast.load(data[:40])
