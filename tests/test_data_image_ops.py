"""Decoding, RandomResizedCrop and CLIP normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from veclip_jax.data import image_ops
from veclip_jax.data.image_ops import ImageDecodeError


def _photo(h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    """A smooth test picture: gradients, so crops and decoders can be compared."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / w, 255 * y / h, 127 + 100 * np.sin((x + y) / 40)], -1)
    return img.clip(0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_crop_boxes_lie_inside_the_image_with_area_and_aspect_in_range():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        left, top, right, bottom = image_ops.random_resized_crop_box(
            rng, 375, 500, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
        )
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 + 1e-9 and 0 <= top < bottom <= 375 + 1e-9
        assert 3 / 4 - 1e-9 <= w / h <= 4 / 3 + 1e-9
        # Either a sampled box (area fraction within scale) or the full-height fallback.
        assert 0.08 - 1e-9 <= w * h / (375 * 500) <= 1.0 + 1e-9


def test_crop_area_follows_the_scale_range():
    rng = np.random.default_rng(1)
    fractions = []
    for _ in range(2000):
        left, top, right, bottom = image_ops.random_resized_crop_box(
            rng, 400, 400, scale=(0.5, 0.9), ratio=(1.0, 1.0)
        )
        fractions.append((right - left) * (bottom - top) / 400**2)
    assert 0.5 - 1e-9 <= min(fractions) and max(fractions) <= 0.9 + 1e-9
    assert abs(np.mean(fractions) - 0.7) < 0.01  # uniform on [0.5, 0.9]


def test_box_that_cannot_fit_falls_back_to_a_centred_crop_with_clamped_aspect():
    rng = np.random.default_rng(0)
    # A 10:1 strip cannot hold a box of aspect <= 4/3 with 90 % of its area.
    box = image_ops.random_resized_crop_box(rng, 50, 500, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3))
    assert box == pytest.approx((250 - 50 * 4 / 3 / 2, 0, 250 + 50 * 4 / 3 / 2, 50))


def test_simplejpeg_and_pil_paths_give_the_same_crop():
    data = _jpeg(_photo())
    crops = {}
    for decoder in image_ops.DECODERS:
        rng = np.random.default_rng(5)
        crops[decoder] = image_ops.decode_random_crop(
            data, rng, size=224, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), decoder=decoder
        )
        assert crops[decoder].shape == (224, 224, 3) and crops[decoder].dtype == np.uint8
    diff = np.abs(crops["simplejpeg"].astype(int) - crops["pil"].astype(int))
    # Same box; only the decoders' DCT scaling and rounding differ.
    assert diff.mean() < 2.0, diff.mean()


def test_crop_matches_a_direct_crop_and_resize_of_the_pixels():
    img = _photo()
    rng = np.random.default_rng(3)
    # resize="pil": PIL's sub-pixel box (the torch path's whole-pixel box: tests/test_decode_speed.py)
    kw = dict(size=64, scale=(0.3, 0.5), ratio=(1.0, 1.0))
    out = image_ops.decode_random_crop(_png(img), rng, resize="pil", **kw)
    box = image_ops.random_resized_crop_box(
        np.random.default_rng(3), 375, 500, scale=(0.3, 0.5), ratio=(1.0, 1.0)
    )
    ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC, box=box))
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_png_grayscale_and_rgba_images_decode_to_rgb():
    img = _photo(60, 80)
    gray = np.ascontiguousarray(img[..., :1])
    cases = [
        _png(img),
        simplejpeg.encode_jpeg(gray, colorspace="GRAY", colorsubsampling="Gray"),
        _png(np.concatenate([img, np.full((60, 80, 1), 255, np.uint8)], -1)),
    ]
    for data in cases:
        out = image_ops.decode_random_crop(
            data, np.random.default_rng(0), size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0)
        )
        assert out.shape == (32, 32, 3)


@pytest.mark.parametrize("decoder", image_ops.DECODERS)
def test_undecodable_bytes_raise_image_decode_error(decoder):
    jpeg = _jpeg(_photo())
    for data in (b"", b"not an image at all", jpeg[:200], jpeg[: len(jpeg) // 2]):
        with pytest.raises(ImageDecodeError):
            image_ops.decode_random_crop(
                data, np.random.default_rng(0), size=32, scale=(0.9, 1.0), ratio=(1.0, 1.0), decoder=decoder
            )


def test_normalize_is_clip_mean_std_on_unit_pixels():
    img = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    ref = (img / 255.0 - np.array(image_ops.CLIP_MEAN)) / np.array(image_ops.CLIP_STD)
    out = image_ops.normalize(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_reduced_scale_decode_matches_a_full_resolution_crop():
    # A 2000x1600 JPEG cropped to 64 px is decoded at a fraction of its size
    # (libjpeg DCT scaling); the result must still be the full-resolution crop.
    img = _photo(1600, 2000)
    kw = dict(size=64, scale=(0.5, 0.6), ratio=(1.0, 1.0))
    box = image_ops.random_resized_crop_box(
        np.random.default_rng(9), 1600, 2000, scale=kw["scale"], ratio=(1, 1)
    )
    min_h, min_w = image_ops._min_decode_size(box, 64, 1600, 2000)
    assert min_h < 1600 // 4 and min_w < 2000 // 4  # so the fast path is taken
    out = image_ops.decode_random_crop(_jpeg(img), np.random.default_rng(9), decoder="simplejpeg", **kw)
    ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC, box=box))
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 2.0


def _gray_ramp() -> np.ndarray:
    return np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16 x 64, values 0..252


def _in_mode(gray: np.ndarray, mode: str) -> Image.Image:
    """The 8-bit picture `gray` as a PIL image of `mode`, with the same intensities in that mode's range."""
    h, w = gray.shape
    if mode in ("I;16", "I;16B"):
        return Image.frombytes(
            mode, (w, h), (gray.astype(">u2" if mode == "I;16B" else "<u2") * 257).tobytes()
        )
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 257)
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / 255)
    if mode == "LA":
        return Image.fromarray(np.stack([gray, np.full_like(gray, 200)], -1))
    rgb = Image.fromarray(np.stack([gray] * 3, -1))
    if mode == "PA":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE).convert("PA")
    if mode == "1":
        return Image.fromarray(np.where(gray > 127, 255, 0).astype(np.uint8)).convert("1")
    return rgb.convert(mode)  # CMYK, L, RGBA


ALL_MODES = ("I;16", "I;16B", "I", "F", "LA", "PA", "CMYK", "1", "L", "RGBA")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_pil_mode_converts_to_rgb_uint8_with_its_intensities(mode):
    # Issue 10, case 8: PIL's convert("RGB") clips 16-bit values to 255 (a 16-bit PNG became near-white).
    gray = _gray_ramp()
    want = np.where(gray > 127, 255, 0) if mode == "1" else gray.astype(int)
    rgb = np.asarray(image_ops.to_rgb(_in_mode(gray, mode)))
    assert rgb.dtype == np.uint8 and rgb.shape == (*gray.shape, 3)
    assert np.abs(rgb.astype(int) - want[..., None]).max() <= 1


FILES = [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("LA", "PNG"), ("PA", "TIFF"),
         ("CMYK", "TIFF"), ("1", "PNG")]  # fmt: skip


@pytest.mark.parametrize("mode,fmt", FILES)
def test_high_bit_depth_and_odd_mode_files_train_evaluate_and_verify_with_their_intensities(mode, fmt):
    gray = _gray_ramp()
    buf = io.BytesIO()
    _in_mode(gray, mode).save(buf, format=fmt)
    data = buf.getvalue()
    want = float(np.where(gray > 127, 255, 0).mean() if mode == "1" else gray.mean())
    crop = image_ops.decode_random_crop(data, np.random.default_rng(0), size=16, scale=(1.0, 1.0),
                                        ratio=(4.0, 4.0), decoder="pil")  # fmt: skip
    # The evaluation transform (veclip_jax.load, the evaluator), back to pixel values: the shorter
    # side (16) kept, a centre 16 x 16 crop.
    ev = image_ops.EvalPreprocess(16, 16)(Image.open(io.BytesIO(data)))  # uint8 pixels (model normalises)
    assert ev.dtype == np.uint8
    assert abs(crop.mean() - want) < 6, crop.mean()
    assert abs(ev.mean() - gray[:, 24:40].mean()) < 6 if mode != "1" else ev.max() == 255
    assert image_ops.image_decodes(data)
