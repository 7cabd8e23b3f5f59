"""Image decoding, CLIP's RandomResizedCrop, and CLIP normalisation.

Decoders: simplejpeg (libjpeg-turbo, the fastest JPEG decoder on PyPI; see
shared/spec/ENV.md §6) with PIL as the fallback for everything it does not
take (PNG, WebP, CMYK JPEGs, ...). Whichever decodes, the crop box is drawn
from the image's size alone, so both decoders give the same crop for the same
random generator.

The crop is decoded at reduced scale when the crop box is large compared to
the output (libjpeg's DCT scaling, M/8 factors), with no pixel read below the
output resolution (the decoded crop is never smaller than the output): a
500x375 image cropped to 224 px decodes at 313x235 and resizes from there.
The decode alone is then no cheaper than a full one (entropy decoding, the
same at every scale, is most of it; libjpeg-turbo's 5/8-7/8 IDCTs have no
SIMD code) but the bicubic resize, PIL's and the larger cost, is: decode +
resize 2.3 ms against 3.0 from full size (CPU, bench.input's photos). Except
at 7/8, where both together cost more than a full decode and resize (3.6
against 3.0 ms at 500x375, 12.3 against 10.2 at 1024x768, the same box; on
256-300 px photos the two are within 15 %, either way): such crops decode at
full size (`_jpeg_decode_size`), the exact pixels. PIL's `draft` does the same
with powers of two. With torch's resize (below) 5/8 and 6/8 lose too, and
decode at full size: only 1/8-4/8 (SIMD IDCTs) pay.

The resize (`resize="torch"`, data.resize_backend, the default) is torch's
uint8 antialiased bicubic (`interpolate(antialias=True)`: PIL's filter, ported,
with AVX2 code): 0.3-0.4 ms against PIL's 1.0-1.5 for the same 224-px crop. It
takes no sub-pixel box, so the box is rounded to whole pixels of the decoded
(scaled) image, each edge moving at most half a pixel there: the crop's
extent by at most 1/n of n decoded pixels (n >= size but for an upscaled
crop; 0.45 % at 224 px), its area and aspect by about 2/n (0.9 %), no bias
(rounded half up). Against PIL on the same whole-pixel box it is the same filter to the
rounding (max difference 1-2, >= 66 dB); against the exact crop (full-size
decode, PIL, sub-pixel box) the half-pixel shift gives 39.7 / 46.4 dB (worst /
median, bench.input's noisy photos, 500x375) and 40.2 / 45.5 (1024x768), the
PIL path 36.2 / 38.3 and 50.9 / 51.2. "pil" keeps PIL's sub-pixel box. torch
is imported at the first crop (a grain worker: 180 MiB more RSS, 130 MiB more
PSS, no more threads) and pinned to one thread, the pipeline's threads and worker processes being the
parallelism. Over 520 lines: the decode and its two resize paths belong
together.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageMode

try:
    import simplejpeg
except ImportError:  # the PIL path then serves every image
    simplejpeg = None

# CLIP's statistics (OpenAI), on [0, 1] pixels; VeCLIP uses the same.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN_255 = np.asarray(CLIP_MEAN, np.float32) * 255.0
_INV_STD_255 = 1.0 / (np.asarray(CLIP_STD, np.float32) * 255.0)

# Larger images are refused rather than decoded (a 2^28-pixel RGB image is
# 768 MiB); PIL's own bomb check is of the same order.
MAX_PIXELS = 1 << 28
# ... and so are images whose decoded pixels take more bytes than this, read
# from the header before decoding: width * height * bytes per pixel of the
# mode. Pixels alone let a 328 KB 13000x13000 16-bit PNG through (3.1 GB and
# 14 s a decode); 256 MiB still takes a 9000x9000 8-bit RGB photo.
MAX_DECODE_BYTES = 1 << 28
# Evaluation preprocessing resizes only the centre crop's source region once
# the resized image's long side exceeds this many times its short side: a
# 1x200000 PNG scaled to a 224-px short side would be 45M pixels (and ~120 GB
# as float32). Below it, the full resize then crop (HF CLIPImageProcessor's
# exact pixels).
MAX_EVAL_ASPECT = 4

DECODERS = ("simplejpeg", "pil")
RESIZE_BACKENDS = ("torch", "pil")  # the training crop's resize (module docstring)

# open_clip's training crop uses bicubic (torchvision's RandomResizedCrop with
# InterpolationMode.BICUBIC).
_RESAMPLE = Image.Resampling.BICUBIC

Box = tuple[float, float, float, float]  # left, top, right, bottom, in pixels


class ImageDecodeError(ValueError):
    """The bytes are not an image any decoder can read."""


def has_simplejpeg() -> bool:
    """Whether the simplejpeg decoder is installed."""
    return simplejpeg is not None


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Box:
    """A RandomResizedCrop box, as in CLIP training (Inception-style crop).

    Area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`;
    up to 10 tries to fit the image, then the largest centred box whose aspect
    is within `ratio`. The box is in float pixels (sub-pixel placement).
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # All ten tries' numbers in one call: scalar Generator calls cost ~1.5 us each.
    u = rng.random((10, 4)).tolist()
    for u_area, u_aspect, u_left, u_top in u:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            left = (width - w) * u_left
            top = (height - h) * u_top
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], float(height)
    else:
        w, h = float(width), float(height)
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


# PIL modes holding more than 8 bits per sample. PIL's own convert("RGB") clips
# them to 255 instead of scaling, so a 16-bit PNG came out near-white.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Modes with an alpha channel or palette transparency: through RGBA, so the
# palette's transparency is read (PIL warns otherwise); alpha is then dropped
# as open_clip's convert("RGB") does.
_VIA_RGBA_MODES = frozenset({"P", "PA", "LA", "La", "RGBa"})


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """Bytes of a `mode` image of width x height once decoded (4 a pixel for a mode PIL does not size)."""
    try:
        m = ImageMode.getmode(mode)
        per_pixel = len(m.bands) * int(m.typestr[-1])
    except (KeyError, ValueError):
        per_pixel = 4
    return width * height * per_pixel


def check_decode_budget(mode: str, width: int, height: int) -> None:
    """ImageDecodeError for an empty image or one over MAX_PIXELS or MAX_DECODE_BYTES (header sizes)."""
    if height < 1 or width < 1 or height * width > MAX_PIXELS:
        raise ImageDecodeError(f"image of {width}x{height} pixels is empty or exceeds {MAX_PIXELS}")
    if (n := decoded_bytes(mode, width, height)) > MAX_DECODE_BYTES:
        raise ImageDecodeError(
            f"{mode} image of {width}x{height} pixels decodes to {n} bytes, over {MAX_DECODE_BYTES}"
        )


# Rows converted at a time from 16/32-bit to 8-bit: the integer temporaries stay this many elements.
_CONVERT_CHUNK = 1 << 18


def _to_uint8_scaled(a: np.ndarray) -> np.ndarray:
    """16-bit range (clipped to [0, 65535]) -> uint8, x / 257 rounded, in row chunks (no full-size int64)."""
    out = np.empty(a.shape, np.uint8)
    if a.size == 0:
        return out
    rows = max(1, _CONVERT_CHUNK // (a.size // len(a)))
    for start in range(0, len(a), rows):
        block = a[start : start + rows]
        if block.dtype.kind != "u" or block.dtype.itemsize > 2:
            block = np.clip(block, 0, 65535)  # mode I: 32-bit integers
        block = block.astype(np.uint32)  # 65535 * 255 + 32767 fits in 32 bits
        block *= 255
        block += 32767
        block //= 65535
        out[start : start + rows] = block
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> an 8-bit RGB image, scaling high-bit-depth modes rather than clipping them.

    I;16* (16-bit PNG/TIFF) and I (32-bit integers, read as the 16-bit range
    they hold in image files) are scaled by 255/65535; F (float) is read as
    [0, 1] when all its values lie there, else as [0, 255], and clipped; 1, L,
    P, PA, LA, RGBA, CMYK, YCbCr... go through PIL's conversions (alpha
    dropped). Raises ValueError for a mode PIL cannot convert.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        gray = _to_uint8_scaled(np.asarray(img))  # x / 257, rounded
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _VIA_RGBA_MODES:
        img = img.convert("RGBA")
    return img.convert("RGB")


_torch = None  # imported at the first torch resize: a process that never crops does not pay for it


def _torch_or_none():
    """torch, pinned to one intra-op thread (one pool per process would oversubscribe the workers);
    None when it is not installed (then PIL resizes)."""
    global _torch
    if _torch is None:
        try:
            import torch
        except ImportError:
            _torch = False
        else:
            torch.set_num_threads(1)
            _torch = torch
    return _torch or None


def whole_pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """`box` rounded (half up) to whole pixels of a width x height image, at least 1 pixel each way:
    each edge moves at most half a pixel (but for a box under a pixel wide)."""
    left, top = (min(max(math.floor(v + 0.5), 0), n - 1) for v, n in ((box[0], width), (box[1], height)))
    right = min(max(math.floor(box[2] + 0.5), left + 1), width)
    bottom = min(max(math.floor(box[3] + 0.5), top + 1), height)
    return left, top, right, bottom


def _resize_box(img: Image.Image | np.ndarray, box: Box, size: int, full: tuple[int, int]) -> np.ndarray:
    """Crops `box` (given in `full` = (width, height) pixels) out of `img` and resizes it: a PIL
    image by PIL (sub-pixel box), an RGB array (writable: torch.from_numpy) by torch (whole pixels)."""
    h, w = (img.height, img.width) if isinstance(img, Image.Image) else img.shape[:2]
    sx, sy = w / full[0], h / full[1]
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if isinstance(img, Image.Image):
        return np.asarray(img.resize((size, size), _RESAMPLE, box=scaled))
    left, top, right, bottom = whole_pixel_box(scaled, w, h)
    return _torch_resize(img[top:bottom, left:right], size, size)


def _torch_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HWC `img` -> [height, width, 3] by torch's antialiased bicubic, C-contiguous.

    The input is first made contiguous (a crop's rows are strided): as channels-last NCHW torch's
    SIMD kernel then writes channels-last too, i.e. HWC, and is faster (0.29 against 0.41 ms,
    475x340 -> 224); a strided input gives planar (CHW) output, whose HWC copy costs 0.2-0.3 ms
    more, paid wherever the batch is next made contiguous (grain's worker transfer, device_put).
    """
    # NHWC -> NCHW view with the batch stride H*W*3 (a `[None]` after the permute gets stride 3, and
    # torch then no longer sees a channels-last tensor: planar output)
    x = _torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0).permute(0, 3, 1, 2)
    out = _torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


# libjpeg scales that cost more (decode + resize) than decoding at the next larger scale: 7/8's IDCT
# is C code while 8/8's is SIMD (measured in the module docstring).
_SLOW_SCALES = frozenset({7})
# ... and with torch's resize, 3-4x cheaper than PIL's, 5/8 and 6/8 too: decode + resize 6.5 / 7.3 ms
# against 5.8 from full size at 1024x768, 1.7 / 1.9 against 1.8 at 500x375 (CPU, under load).
_SLOW_SCALES_TORCH = frozenset({5, 6, 7})


def _jpeg_decode_size(
    min_h: int, min_w: int, height: int, width: int, slow: frozenset[int] = _SLOW_SCALES
) -> tuple[int, int] | None:
    """(height, width) to ask simplejpeg for: the least M/8 scale (M < 8, not slow) still covering
    (min_h, min_w), as libjpeg rounds (ceil(dim * M / 8)); None: decode at full size."""
    for m in range(1, 8):
        h, w = -(-height * m // 8), -(-width * m // 8)
        if h >= min_h and w >= min_w:
            return None if m in slow else (h, w)
    return None


def _min_decode_size(box: Box, size: int, height: int, width: int) -> tuple[int, int]:
    """Smallest full-image (height, width) at which the crop box still covers `size` pixels."""
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    return math.ceil(size * height / crop_h), math.ceil(size * width / crop_w)


def _open_pil(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    check_decode_budget(img.mode, img.width, img.height)  # from the header: nothing decoded yet
    return img


def decode_random_crop(
    data: bytes,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    decoder: str = "simplejpeg",
    resize: str = "torch",
) -> np.ndarray:
    """Decodes an encoded image and returns a RandomResizedCrop of it: uint8 [size, size, 3].

    `resize`: "torch" (the box rounded to whole decoded pixels, torch's kernel;
    PIL when torch is not installed) or "pil" (PIL, sub-pixel box): module docstring.
    Raises ImageDecodeError if no decoder can read the bytes.
    """
    return decode_random_crops(
        data, [rng], size=size, scale=scale, ratio=ratio, decoder=decoder, resize=resize
    )[0]


def decode_random_crops(
    data: bytes,
    rngs: Sequence[np.random.Generator],
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    decoder: str = "simplejpeg",
    resize: str = "torch",
) -> np.ndarray:
    """Several RandomResizedCrops of one image, decoded once: uint8 [len(rngs), size, size, 3].

    Crop k's box is drawn from rngs[k] (exactly as decode_random_crop draws
    it, so with one generator the two functions agree to the pixel). The
    image is decoded once, at the reduced scale that still gives every box
    `size` pixels. Raises ImageDecodeError if no decoder can read the bytes.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if resize not in RESIZE_BACKENDS:
        raise ValueError(f"resize must be one of {RESIZE_BACKENDS}, got {resize!r}")
    if not rngs:
        raise ValueError("decode_random_crops needs at least one generator")
    use_sj = decoder == "simplejpeg" and simplejpeg is not None
    try:
        pil_img = None
        dims = None
        if use_sj:
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                dims = (height, width)
            except ValueError:
                pass
            else:
                check_decode_budget("RGB", width, height)  # simplejpeg decodes to RGB
        if dims is None:
            pil_img = _open_pil(data)
            dims = (pil_img.height, pil_img.width)
        height, width = dims
        boxes = [random_resized_crop_box(rng, height, width, scale=scale, ratio=ratio) for rng in rngs]
        needs = [_min_decode_size(box, size, height, width) for box in boxes]
        min_h, min_w = max(n[0] for n in needs), max(n[1] for n in needs)
        img = None
        use_torch = resize == "torch" and _torch_or_none() is not None
        if pil_img is None:
            try:
                slow = _SLOW_SCALES_TORCH if use_torch else _SLOW_SCALES
                if scaled := _jpeg_decode_size(min_h, min_w, height, width, slow):
                    arr = simplejpeg.decode_jpeg(
                        data, colorspace="RGB", min_height=scaled[0], min_width=scaled[1]
                    )
                else:
                    arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
                img = arr  # the PIL resize wraps it (_resize_box); torch's takes it as it is
            except ValueError:
                pil_img = _open_pil(data)  # as decode_random_crop: PIL decides, with the same boxes
        if img is None:
            if pil_img.format == "JPEG":
                pil_img.draft("RGB", (min_w, min_h))
            img = to_rgb(pil_img)  # also loads; every mode ends up 8-bit RGB (16-bit scaled, not clipped)
        if use_torch:
            if isinstance(img, Image.Image):
                img = np.array(img)  # writable (PIL's own array view is not, and torch warns)
        elif not isinstance(img, Image.Image):
            img = Image.fromarray(img)  # once for all the boxes
        return np.stack([_resize_box(img, box, size, (width, height)) for box in boxes])
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def image_decodes(data: bytes) -> bool:
    """Whether the decoders above read `data`; cheap for JPEGs (decoded at 1/8 scale).

    The converter's check (data/convert.py): an image that passes it does not
    fail in training. Mirrors decode_random_crop: simplejpeg (strict) first,
    PIL for what it refuses, images of more than MAX_PIXELS pixels refused.
    """
    if not data:
        return False
    if simplejpeg is not None:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # not a JPEG simplejpeg knows: PIL decides
        else:
            try:
                check_decode_budget("RGB", width, height)
            except ImageDecodeError:
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
                check_decode_budget(img.mode, img.width, img.height)  # ImageDecodeError: False
                if img.format == "JPEG":
                    img.draft("RGB", (1, 1))  # smallest DCT scale: the whole stream is still read
                img.load()
                to_rgb(img)  # the pipeline's conversion: a mode it cannot convert fails here too
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return False


def open_image(image: bytes | str | os.PathLike | Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """A PIL image (decoded) or an RGB uint8 array from a decoded array, encoded bytes or a file path.

    The decode budget is checked from the header, before decoding (a small file may decode to
    gigabytes: a 16-bit bomb); 16-bit images are scaled, not clipped; a greyscale array gets 3 channels.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):  # greyscale (MNIST, ...)
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
        return image
    if isinstance(image, bytes):
        image = io.BytesIO(image)
    with Image.open(image) as img:
        check_decode_budget(img.mode, img.width, img.height)
        rgb = to_rgb(img)
        rgb.load()  # decoded here, while the file is open (an RGB image is returned as it was opened)
        return rgb


def normalize(
    image: np.ndarray,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """uint8 (or 0-255 float) RGB [..., 3] -> float32, mean/std normalised (CLIP's by default).

    The reference of the normalisation the model now does itself, inside the jitted step
    (models/clip.py `normalize_pixels`, the same float32 arithmetic): the pipeline and evaluation
    send uint8 pixels. Kept for tests, benchmarks and users who feed other tools.
    """
    out = np.asarray(image).astype(np.float32)
    mean_255, inv_std_255 = _MEAN_255, _INV_STD_255
    if tuple(mean) != CLIP_MEAN or tuple(std) != CLIP_STD:
        mean_255 = np.asarray(mean, np.float32) * np.float32(255.0)
        inv_std_255 = np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))
    # In place: a third faster than the expression form, which makes two temporaries.
    out -= mean_255
    out *= inv_std_255
    return out


def _shorter_side_dims(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side `size`, the longer int(size * long / short): HF's rule."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def _resize_center_crop_pil(image: Image.Image, size: int, crop: int, resample: int) -> np.ndarray:
    """uint8 [crop, crop, C]: the shorter side resized to `size`, then the centre crop.

    An elongated image (long side over MAX_EVAL_ASPECT x the short one once
    resized) has only the crop's source region resized (PIL's `box`, which
    filters with the pixels around it too): the full resize would be as long
    as the image is elongated (a 1x200000 image at 224 px: 45M pixels).
    """
    w, h = image.size
    new_w, new_h = _shorter_side_dims(w, h, size)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    if max(new_w, new_h) <= MAX_EVAL_ASPECT * size:
        resized = image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), resample)
        return np.asarray(resized)[top : top + crop, left : left + crop]
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return np.asarray(image.resize((crop, crop), resample, box=box))


def _check_eval_image(image: Image.Image | np.ndarray) -> None:
    """The decode budget, for an image handed to evaluation (PIL ones are checked before they load)."""
    if isinstance(image, Image.Image):
        check_decode_budget(image.mode, image.width, image.height)
    else:
        arr = np.asarray(image)
        if arr.ndim < 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ImageDecodeError(f"image array of shape {arr.shape} is empty")


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Evaluation preprocessing: shorter side to `size` (bicubic), centre `size` x `size` crop.

    uint8 [size, size, 3]. The arithmetic is HF `CLIPImageProcessor`'s
    (shortest_edge = crop = size; the crop starts at (extent - size) // 2), so
    an exported model's processor sees the same pixels as our evaluation.
    Raises ImageDecodeError for an image over the decode budget.
    """
    _check_eval_image(image)
    return _resize_center_crop_pil(to_rgb(image), size, size, _RESAMPLE)


def _decode_jpeg_for_eval(
    data: bytes, size: int, takes: Callable[[tuple[int, int]], bool]
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(RGB array, the image's full (width, height)) of a JPEG decoded at the least fast DCT scale
    (1/8-4/8) still giving HF's resized size (shorter side `size`), else full size; None, before any
    decoding: not a JPEG simplejpeg reads, or an image whose (width, height) `takes` refuses (PIL
    then decodes it, as in exact mode)."""
    if simplejpeg is None:
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    check_decode_budget("RGB", width, height)
    if not takes((width, height)):
        return None
    new_w, new_h = _shorter_side_dims(width, height, size)
    try:
        if scaled := _jpeg_decode_size(new_h, new_w, height, width, _SLOW_SCALES_TORCH):
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=scaled[0], min_width=scaled[1])
        else:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:  # CMYK, progressive oddities, ...: PIL's turn
        return None
    return arr, (width, height)


def _resize_center_crop_torch(arr: np.ndarray, full: tuple[int, int], size: int, crop: int) -> np.ndarray:
    """HF's arithmetic (shorter side of the `full` (width, height) image to `size`, centre crop) on an
    RGB array of that image at any scale, resized by torch's antialiased bicubic."""
    new_w, new_h = _shorter_side_dims(*full, size)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    resized = arr if arr.shape[:2] == (new_h, new_w) else _torch_resize(arr, new_h, new_w)
    return resized[top : top + crop, left : left + crop]


def _bilinear_axis(
    out_size: int, in_size: int, start: int = 0, count: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (lower, upper) and weights of half-pixel-centre bilinear sampling, no antialias.

    For output positions start .. start + count (all by default): a crop's
    rows alone, however long the full output.
    """
    stop = out_size if count is None else start + count
    # float32 coordinates, as TF's (and torch's) kernels compute them
    scale = np.float32(in_size) / np.float32(out_size)
    x = (np.arange(start, stop).astype(np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(x)
    lower = np.clip(floor, 0, in_size - 1).astype(np.int64)
    upper = np.clip(np.ceil(x), 0, in_size - 1).astype(np.int64)
    return lower, upper, (x - floor).astype(np.float32)


def bilinear_resize(
    image: np.ndarray, height: int, width: int, *, window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """float32 [height, width, C]: TF2 `tf.image.resize(method="bilinear", antialias=False)`.

    Half-pixel centres, edge samples clamped, no antialiasing, no rounding of
    the result: what VeCLIP's released evaluation (`clip_processor.py`) uses,
    and torch's `interpolate(mode="bilinear", align_corners=False)` too.
    `window` (top, left, crop_height, crop_width) computes only that part of
    the resized image, the same values, sampling the input before it becomes
    float32 (an elongated image's full resize would not fit in memory).
    """
    top, left, out_h, out_w = window if window is not None else (0, 0, height, width)
    img = np.asarray(image)
    lo, hi, t = _bilinear_axis(height, img.shape[0], top, out_h)
    a, b = img[lo].astype(np.float32), img[hi].astype(np.float32)
    img = a + (b - a) * t[:, None, None]
    lo, hi, t = _bilinear_axis(width, img.shape[1], left, out_w)
    return img[:, lo] + (img[:, hi] - img[:, lo]) * t[None, :, None]


@dataclasses.dataclass(frozen=True)
class EvalPreprocess:
    """An image (PIL or uint8 HWC array, any size) -> its pixels [crop, crop, 3], not normalised.

    method "bicubic": `resize_center_crop` (HF CLIPImageProcessor's arithmetic,
    PIL bicubic; what we train-evaluate and export with). "bilinear": PIL
    bilinear, same arithmetic. Both give uint8. "tf_bilinear": VeCLIP's released
    evaluation (shorter side to `size` by `bilinear_resize`, the longer side
    rounded half-to-even as TF does, a centre crop, float pixels throughout):
    float32 in [0, 255], unrounded, as VeCLIP's evaluation feeds them.

    `fast` ("bicubic" only; `launch/eval.py --fast_decode`): the same
    arithmetic, but a JPEG given encoded (`load`) is decoded at the least DCT
    scale that still covers the resized image (1/8-4/8, as the training crop),
    and the resize is torch's antialiased bicubic (PIL's filter to the
    rounding): 2.4x (500x375) to 2.9x (1024x768) less CPU an image than the
    exact path (bench.input's `eval_fast_ms_per_record`), at 48-50 dB PSNR
    against it where the decode is scaled, at most 1 level apart where it is
    not (tests/test_eval_fast.py). Not HF's pixels: the default stays exact,
    so zero-shot numbers compare with HF's and open_clip's.

    The mean/std normalisation is the model's (config.model.vision.image_mean /
    image_std), done inside its jitted computation (models/clip.py): the host
    ships 1 byte a channel. `normalize(out, mean, std)` is the float reference.
    """

    size: int  # the shorter side after resizing
    crop: int
    method: str = "bicubic"
    fast: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("bicubic", "bilinear", "tf_bilinear"):
            raise ValueError(f"unknown resize method {self.method!r}")
        if self.crop > self.size:
            raise ValueError(f"crop {self.crop} is larger than the resized shorter side {self.size}")
        if self.fast and self.method != "bicubic":
            raise ValueError(f"fast decoding resizes bicubic; this preprocessing is {self.method!r}")

    def _fast(self, full: tuple[int, int]) -> bool:
        """Whether the fast path takes an image of this (width, height): torch installed, not elongated."""
        new_w, new_h = _shorter_side_dims(*full, self.size)
        return self.fast and max(new_w, new_h) <= MAX_EVAL_ASPECT * self.size and _torch_or_none() is not None

    def load(self, image: bytes | str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
        """`image` as it is stored (encoded bytes, a file path, or decoded) -> its pixels, as __call__.

        Fast mode decodes a JPEG itself (reduced scale); otherwise `open_image` then __call__.
        """
        if self.fast and isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                image = f.read()
        if self.fast and isinstance(image, bytes):
            if (decoded := _decode_jpeg_for_eval(image, self.size, self._fast)) is not None:
                arr, full = decoded
                return np.ascontiguousarray(_resize_center_crop_torch(arr, full, self.size, self.crop))
        return self(open_image(image))

    def _cropped(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The centre crop of the resized image, computed without the rest of it when that is large."""
        _check_eval_image(image)
        if self.fast:
            pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
            if self._fast(pil.size):
                return _resize_center_crop_torch(np.array(to_rgb(pil)), pil.size, self.size, self.crop)
        if self.method == "tf_bilinear":
            arr = np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image)
            h, w = arr.shape[:2]
            scale = np.float32(self.size) / np.float32(min(h, w))
            new_h, new_w = (int(np.round(scale * np.float32(d))) for d in (h, w))
            window = ((new_h - self.crop) // 2, (new_w - self.crop) // 2, self.crop, self.crop)
            return bilinear_resize(arr, new_h, new_w, window=window)
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
        resample = _RESAMPLE if self.method == "bicubic" else Image.Resampling.BILINEAR
        return _resize_center_crop_pil(to_rgb(pil), self.size, self.crop, resample)

    @property
    def dtype(self) -> np.dtype:
        """What `__call__` gives: uint8, or float32 for "tf_bilinear" (unrounded bilinear pixels)."""
        return np.dtype(np.float32 if self.method == "tf_bilinear" else np.uint8)

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Raises ImageDecodeError for an image over the decode budget (MAX_DECODE_BYTES) or empty."""
        return np.ascontiguousarray(self._cropped(image), self.dtype)
