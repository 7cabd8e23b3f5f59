"""MoCo v2 image views, as the DeCLIP toolkit's SLIP / DeCLIP / FILIP inputs use them.

Each view of an image is, in this order (torchvision's transforms on a PIL
image, which is what the toolkit runs):

  RandomResizedCrop(S, scale=data.augment.view_crop_scale, ratio=data.crop_ratio), bicubic
  ColorJitter(brightness, contrast, saturation, hue), applied with p = color_jitter_prob:
    factors uniform in [max(0, 1 - x), 1 + x], the hue shift uniform in [-h, h],
    the four adjustments in a random order
  grayscale (ITU-R 601 luma, copied to the three channels) with p = grayscale_prob
  Gaussian blur with sigma uniform in blur_sigma (in output pixels), with p = blur_prob
  horizontal flip with p = flip_prob
  uint8 pixels, as the "image" input (the model normalises them in its jitted step)

The adjustments are PIL's (ImageEnhance, ImageFilter.GaussianBlur), the same
calls torchvision makes for PIL images; the hue shift is torchvision's (the
HSV hue channel shifted in uint8, wrapping), skipped when it rounds to zero.

View v of an example draws everything from its own generator, the pipeline's
`seeds.example_rng(seed, STREAM_VIEW, epoch, index, v)`: first its crop box,
then a fixed set of numbers (`ViewParams.draw`), so each decision is
independent of the others and a view is reproducible on its own. The image
is decoded once for all views (image_ops.decode_random_crops).

Cost per example: `python -m veclip_jax.bench.augment` (data/README.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from veclip_jax.data import image_ops

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """The view recipe (config.data.augment and the crop fields; plain values, pickled to workers)."""

    size: int
    views: int = 2
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = 0.5
    decoder: str = "simplejpeg"
    resize: str = "torch"  # data.resize_backend (image_ops.RESIZE_BACKENDS)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"data.augment.{field}={getattr(self, field)!r}: {why}")

        if self.views not in (1, 2):
            raise bad("views", "must be 1 or 2")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"data.augment.view_crop_scale={self.crop_scale!r}: "
                "must be (low, high) with 0 < low <= high <= 1"
            )
        if len(self.color_jitter) != 4 or min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise bad(
                "color_jitter", "must be (brightness, contrast, saturation, hue), each >= 0, hue <= 0.5"
            )
        for field in ("color_jitter_prob", "grayscale_prob", "blur_prob", "flip_prob"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise bad(field, "a probability must lie in [0, 1]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise bad("blur_sigma", "must be (low, high) with 0 < low <= high")


@dataclasses.dataclass(frozen=True)
class ViewParams:
    """The random choices of one view after its crop: what `apply` does."""

    jitter: tuple[tuple[str, float], ...]  # (op, factor) in the order applied; () when not applied
    grayscale: bool
    blur_sigma: float | None
    flip: bool

    @classmethod
    def draw(cls, rng: np.random.Generator, spec: ViewSpec) -> ViewParams:
        """Draws the choices: always 9 uniforms, then a permutation, whatever is applied."""
        u = rng.random(9).tolist()
        order = rng.permutation(len(JITTER_OPS)).tolist()
        b, c, s, h = spec.color_jitter
        factors = {
            "brightness": _uniform(max(0.0, 1 - b), 1 + b, u[1]),
            "contrast": _uniform(max(0.0, 1 - c), 1 + c, u[2]),
            "saturation": _uniform(max(0.0, 1 - s), 1 + s, u[3]),
            "hue": _uniform(-h, h, u[4]),
        }
        jitter = (
            tuple((JITTER_OPS[k], factors[JITTER_OPS[k]]) for k in order)
            if u[0] < spec.color_jitter_prob
            else ()
        )
        lo, hi = spec.blur_sigma
        return cls(
            jitter=jitter,
            grayscale=u[5] < spec.grayscale_prob,
            blur_sigma=_uniform(lo, hi, u[7]) if u[6] < spec.blur_prob else None,
            flip=u[8] < spec.flip_prob,
        )

    def apply(self, image: Image.Image) -> Image.Image:
        """The view's jitter, grayscale, blur and flip, in that order, on an RGB image."""
        for op, factor in self.jitter:
            image = JITTER[op](image, factor)
        if self.grayscale:
            image = grayscale(image)
        if self.blur_sigma is not None:
            image = gaussian_blur(image, self.blur_sigma)
        if self.flip:
            image = hflip(image)
        return image


def _uniform(lo: float, hi: float, u: float) -> float:
    return lo + (hi - lo) * u


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    """Pixels times `factor` (a blend with black), clipped."""
    return ImageEnhance.Brightness(image).enhance(factor)


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    """A blend with the image's mean gray level: 0 gives a flat gray image, 1 the image."""
    return ImageEnhance.Contrast(image).enhance(factor)


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    """A blend with the image's grayscale: 0 gives gray, 1 the image."""
    return ImageEnhance.Color(image).enhance(factor)


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Hue rotated by `shift` turns (in [-0.5, 0.5]), on the uint8 HSV hue channel (wrapping)."""
    steps = int(shift * 255) % 256  # torchvision: np.uint8(hue_factor * 255) added with wrap-around
    if steps == 0:
        return image  # the HSV round trip alone would change pixels
    h, s, v = image.convert("HSV").split()
    h = h.point([(x + steps) % 256 for x in range(256)])  # wraps modulo 256
    return Image.merge("HSV", (h, s, v)).convert("RGB")


JITTER = {
    "brightness": adjust_brightness,
    "contrast": adjust_contrast,
    "saturation": adjust_saturation,
    "hue": adjust_hue,
}


def grayscale(image: Image.Image) -> Image.Image:
    """ITU-R 601 luma (PIL's L: 0.299 R + 0.587 G + 0.114 B), as three equal channels."""
    return image.convert("L").convert("RGB")


def gaussian_blur(image: Image.Image, sigma: float) -> Image.Image:
    """PIL's Gaussian blur with standard deviation `sigma` pixels (MoCo v2's GaussianBlur)."""
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def hflip(image: Image.Image) -> Image.Image:
    """Mirrored left to right."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def decode_views(data: bytes, rngs: Sequence[np.random.Generator], spec: ViewSpec) -> np.ndarray:
    """The views of one encoded image, one per generator: uint8 [len(rngs), S, S, 3] (not normalised).

    Each generator draws its view's crop box, then its ViewParams. Raises
    image_ops.ImageDecodeError if the bytes are not an image.
    """
    crops = image_ops.decode_random_crops(
        data,
        rngs,
        size=spec.size,
        scale=spec.crop_scale,
        ratio=spec.crop_ratio,
        decoder=spec.decoder,
        resize=spec.resize,
    )
    out = np.empty(crops.shape, np.uint8)
    for k, (crop, rng) in enumerate(zip(crops, rngs, strict=True)):
        params = ViewParams.draw(rng, spec)
        out[k] = np.asarray(params.apply(Image.fromarray(crop)))
    return out
