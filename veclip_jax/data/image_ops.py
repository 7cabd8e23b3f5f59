"""Image decoding, CLIP's RandomResizedCrop, and CLIP normalisation.

Decoders: simplejpeg (libjpeg-turbo, the fastest JPEG decoder on PyPI; see
shared/spec/ENV.md §6) with PIL as the fallback for everything it does not
take (PNG, WebP, CMYK JPEGs, ...). Whichever decodes, the crop box is drawn
from the image's size alone, so both decoders give the same crop for the same
random generator.

The crop is decoded at reduced scale when the crop box is large compared to
the output (libjpeg's DCT scaling, M/8 factors): a 500x375 image cropped to
224 px decodes at 313x235 and resizes from there, about 20 % faster than a
full decode, with no pixel read below the output resolution (the decoded crop
is never smaller than the output). PIL's `draft` does the same with powers of
two.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

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

DECODERS = ("simplejpeg", "pil")

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
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        gray = ((a * 255 + 32767) // 65535).astype(np.uint8)  # x / 257, rounded
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _VIA_RGBA_MODES:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _resize_box(img: Image.Image, box: Box, size: int, full: tuple[int, int]) -> np.ndarray:
    """Crops `box` (given in `full` = (width, height) pixels) out of `img` and resizes it."""
    sx, sy = img.width / full[0], img.height / full[1]
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return np.asarray(img.resize((size, size), _RESAMPLE, box=scaled))


def _min_decode_size(box: Box, size: int, height: int, width: int) -> tuple[int, int]:
    """Smallest full-image (height, width) at which the crop box still covers `size` pixels."""
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    return math.ceil(size * height / crop_h), math.ceil(size * width / crop_w)


def _open_pil(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_PIXELS:
        raise ImageDecodeError(f"image of {img.width}x{img.height} pixels exceeds {MAX_PIXELS}")
    return img


def decode_random_crop(
    data: bytes,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    decoder: str = "simplejpeg",
) -> np.ndarray:
    """Decodes an encoded image and returns a RandomResizedCrop of it: uint8 [size, size, 3].

    Raises ImageDecodeError if no decoder can read the bytes.
    """
    return decode_random_crops(data, [rng], size=size, scale=scale, ratio=ratio, decoder=decoder)[0]


def decode_random_crops(
    data: bytes,
    rngs: Sequence[np.random.Generator],
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    decoder: str = "simplejpeg",
) -> np.ndarray:
    """Several RandomResizedCrops of one image, decoded once: uint8 [len(rngs), size, size, 3].

    Crop k's box is drawn from rngs[k] (exactly as decode_random_crop draws
    it, so with one generator the two functions agree to the pixel). The
    image is decoded once, at the reduced scale that still gives every box
    `size` pixels. Raises ImageDecodeError if no decoder can read the bytes.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
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
        if dims is None:
            pil_img = _open_pil(data)
            dims = (pil_img.height, pil_img.width)
        height, width = dims
        if height < 1 or width < 1 or height * width > MAX_PIXELS:
            raise ImageDecodeError(f"image of {width}x{height} pixels is empty or exceeds {MAX_PIXELS}")
        boxes = [random_resized_crop_box(rng, height, width, scale=scale, ratio=ratio) for rng in rngs]
        needs = [_min_decode_size(box, size, height, width) for box in boxes]
        min_h, min_w = max(n[0] for n in needs), max(n[1] for n in needs)
        img = None
        if pil_img is None:
            try:
                if min_h < height and min_w < width:
                    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w)
                else:
                    arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
                img = Image.fromarray(arr)
            except ValueError:
                pil_img = _open_pil(data)  # as decode_random_crop: PIL decides, with the same boxes
        if img is None:
            if pil_img.format == "JPEG":
                pil_img.draft("RGB", (min_w, min_h))
            img = to_rgb(pil_img)  # also loads; every mode ends up 8-bit RGB (16-bit scaled, not clipped)
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
            if height < 1 or width < 1 or height * width > MAX_PIXELS:
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
                if height < 1 or width < 1 or height * width > MAX_PIXELS:
                    return False
                if img.format == "JPEG":
                    img.draft("RGB", (1, 1))  # smallest DCT scale: the whole stream is still read
                img.load()
                to_rgb(img)  # the pipeline's conversion: a mode it cannot convert fails here too
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return False


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32, CLIP mean/std normalised."""
    out = image.astype(np.float32)
    # In place: a third faster than the expression form, which makes two temporaries.
    out -= _MEAN_255
    out *= _INV_STD_255
    return out


def _resize_shorter_side(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Shorter side to `size`, the longer to int(size * long / short): HF CLIPImageProcessor's rule."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), resample)


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Evaluation preprocessing: shorter side to `size` (bicubic), centre `size` x `size` crop.

    uint8 [size, size, 3]. The arithmetic is HF `CLIPImageProcessor`'s
    (shortest_edge = crop = size; the crop starts at (extent - size) // 2), so
    an exported model's processor sees the same pixels as our evaluation.
    """
    return _center_crop(np.asarray(_resize_shorter_side(to_rgb(image), size, _RESAMPLE)), size)


def _bilinear_axis(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (lower, upper) and weights of half-pixel-centre bilinear sampling, no antialias."""
    # float32 coordinates, as TF's (and torch's) kernels compute them
    scale = np.float32(in_size) / np.float32(out_size)
    x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(x)
    lower = np.clip(floor, 0, in_size - 1).astype(np.int64)
    upper = np.clip(np.ceil(x), 0, in_size - 1).astype(np.int64)
    return lower, upper, (x - floor).astype(np.float32)


def bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 [height, width, C]: TF2 `tf.image.resize(method="bilinear", antialias=False)`.

    Half-pixel centres, edge samples clamped, no antialiasing, no rounding of
    the result: what VeCLIP's released evaluation (`clip_processor.py`) uses,
    and torch's `interpolate(mode="bilinear", align_corners=False)` too.
    """
    img = np.asarray(image, np.float32)
    lo, hi, t = _bilinear_axis(height, img.shape[0])
    img = img[lo] + (img[hi] - img[lo]) * t[:, None, None]
    lo, hi, t = _bilinear_axis(width, img.shape[1])
    return img[:, lo] + (img[:, hi] - img[:, lo]) * t[None, :, None]


@dataclasses.dataclass(frozen=True)
class EvalPreprocess:
    """An image (PIL or uint8 HWC array, any size) -> float32 [crop, crop, 3], normalised.

    method "bicubic": `resize_center_crop` (HF CLIPImageProcessor's arithmetic,
    PIL bicubic; what we train-evaluate and export with). "bilinear": PIL
    bilinear, same arithmetic. "tf_bilinear": VeCLIP's released evaluation
    (shorter side to `size` by `bilinear_resize`, the longer side rounded
    half-to-even as TF does, a centre crop, float pixels throughout).
    """

    size: int  # the shorter side after resizing
    crop: int
    method: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.method not in ("bicubic", "bilinear", "tf_bilinear"):
            raise ValueError(f"unknown resize method {self.method!r}")
        if self.crop > self.size:
            raise ValueError(f"crop {self.crop} is larger than the resized shorter side {self.size}")

    def _resized(self, image: Image.Image | np.ndarray) -> np.ndarray:
        if self.method == "tf_bilinear":
            arr = np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image)
            h, w = arr.shape[:2]
            scale = np.float32(self.size) / np.float32(min(h, w))
            new_h, new_w = (int(np.round(scale * np.float32(d))) for d in (h, w))
            return bilinear_resize(arr, new_h, new_w)
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
        resample = _RESAMPLE if self.method == "bicubic" else Image.Resampling.BILINEAR
        return np.asarray(_resize_shorter_side(to_rgb(pil), self.size, resample), np.float32)

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        arr = _center_crop(self._resized(image), self.crop)
        mean = np.asarray(self.mean, np.float32) * 255.0
        std = np.asarray(self.std, np.float32) * 255.0
        return (arr - mean) / std
