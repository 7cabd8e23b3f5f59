"""Embeddings in a few lines, from a run of ours or a HuggingFace CLIP directory.

    import veclip_jax
    model = veclip_jax.load("workdir/demo")              # a workdir, checkpoints dir, or one step's dir
    model = veclip_jax.load("clip-vit-base-patch16/")  # a HF CLIP directory: its tokenizer and preprocessing
    model = veclip_jax.load("veclip_b16_12m/", tokenizer="t5-base/spiece.model")  # released VeCLIP weights
    img = model.encode_image([PIL.Image.open("cat.jpg"), uint8_hwc_array])   # [2, D], L2-normalised numpy
    txt = model.encode_text(["a photo of a cat", "a dog"])                   # [2, D]
    probs = softmax(model.logit_scale * img @ txt.T)

`model.preprocess(image)` (any size -> its pixels [S, S, 3]: uint8, or float
in [0, 255] for VeCLIP's TF-style resize; not normalised) and
`model.tokenize(texts)` (-> int32 [n, context_length]) are the two steps
`encode_*` apply, for use in your own pipelines. Preprocessing: for our runs,
the evaluation transform (shorter side to S, bicubic, centre crop: what an
exported model's CLIPImageProcessor does); for a HF directory, what its
preprocessor_config.json says; for a directory without one (the released
VeCLIP checkpoints), VeCLIP's own (TF-style bilinear resize without
antialiasing, centre crop). The mean/std normalisation is the model's
(`model.model_config.vision.image_mean` / `image_std`: CLIP's, or the HF /
open_clip preprocessor's), applied on the device inside the jitted encoder;
`veclip_jax.data.image_ops.normalize(pixels, mean, std)` gives the
normalised float32 array another tool expects.

The loading is the run layer's (veclip_jax/run/load.py, shared with
standalone evaluation); this module adds the encoding on one device. It
imports neither the trainer nor the evaluation package.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from veclip_jax.objectives.model import variables
from veclip_jax.parallel.mesh import make_mesh, replicated
from veclip_jax.run.inference import Encoders
from veclip_jax.run.load import LoadedModel, load_model

ImageLike = Image.Image | np.ndarray


@dataclasses.dataclass
class LoadedCLIP(LoadedModel):
    """A CLIP model with its tokenizer and preprocessing (see the module doc).

    Fields: model, params, model_config, tokenizer, preprocess, source (what
    was loaded: a checkpoint step directory or a HF directory), batch_size.
    """

    batch_size: int = 64

    def __post_init__(self) -> None:
        mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), [jax.devices()[0]])
        tree = variables(self.params, self.model_state)
        shardings = jax.tree.map(lambda _: replicated(mesh), tree)
        self._variables = jax.device_put(tree, shardings)
        self.params = self._variables["params"]
        self._encoders = Encoders(self.model, mesh, shardings, self.batch_size)

    @property
    def logit_scale(self) -> float:
        """exp(learned temperature), clipped as in training: multiply cosine similarities by it."""
        raw = float(np.asarray(self.params["logit_scale"]))
        return math.exp(min(raw, math.log(self.model.towers.logit_scale_max)))

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        """int32 [n, context_length] token rows, end-of-text and padding included."""
        return self.tokenizer.encode_batch([texts] if isinstance(texts, str) else list(texts))

    def encode_text(self, texts: Sequence[str] | str) -> np.ndarray:
        """float32 [n, embed_dim], L2-normalised."""
        return self._encoders.texts(self._variables, self.tokenize(texts))

    def encode_image(self, images: Sequence[ImageLike] | ImageLike) -> np.ndarray:
        """float32 [n, embed_dim], L2-normalised, from images of any size.

        An image is a PIL image (any mode) or a uint8 array: [H, W] (grayscale),
        [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA, alpha dropped). A uint8
        array [n, H, W, C] or a list is a batch. Float arrays are refused (their
        range is ambiguous: scale to 0-255 uint8 first); anything else raises
        TypeError or ValueError saying what is accepted.
        """
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        elif isinstance(images, np.ndarray) and images.ndim != 4:
            raise ValueError(f"an image array is [H, W] or [H, W, C], a batch [n, H, W, C]: {images.shape}")
        elif not isinstance(images, np.ndarray | Sequence) or isinstance(images, str | bytes):
            raise TypeError(f"encode_image takes a PIL image, a uint8 array or a list of them, "
                            f"not {type(images).__name__}")  # fmt: skip
        pixels = [self.preprocess(_checked_image(im)) for im in images]
        if not pixels:
            return np.zeros((0, self.model.towers.embed_dim), np.float32)
        return self._encoders.images(self._variables, np.stack(pixels))


def _checked_image(image: Any) -> Image.Image | np.ndarray:
    """One image as the preprocessing takes it: PIL, or a uint8 [H, W, 3] array."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, np.ndarray):
        raise TypeError(f"an image is a PIL image or a uint8 numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"image arrays must be uint8 in 0-255, got {image.dtype} (for floats in [0, 1]: "
            "(x * 255).round().astype(np.uint8))"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array is [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"an image needs at least one pixel, got shape {image.shape}")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def load(
    path: str,
    *,
    tokenizer: str | None = None,
    step: int | None = None,
    batch_size: int = 64,
    model_name: str | None = None,
) -> LoadedCLIP:
    """A model to embed images and texts with (see the module doc).

    Args:
      path: a training workdir, its checkpoints directory or one step's
        directory (the newest step unless `step`), or a HF CLIP directory.
      tokenizer: a sentencepiece model or HF tokenizer directory, for a HF
        directory without one (or to override the one found).
      batch_size: images or texts per compiled encoding call.
      model_name: open_clip's model config (e.g. "RN50-quickgelu") for a bare open_clip state dict
        (an open_clip directory with open_clip_config.json needs none).
    """
    m = load_model(path, tokenizer=tokenizer, step=step, model_name=model_name)
    return LoadedCLIP(
        m.model, m.params, m.model_config, m.tokenizer, m.preprocess, m.source, m.model_state, batch_size
    )
