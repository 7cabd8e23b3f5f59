"""Embeddings in a few lines, from a run of ours or a HuggingFace CLIP directory.

    import veclip_jax
    model = veclip_jax.load("workdir/demo")              # a workdir, checkpoints dir, or one step's dir
    model = veclip_jax.load("clip-vit-base-patch16/")  # a HF CLIP directory: its tokenizer and preprocessing
    model = veclip_jax.load("veclip_b16_12m/", tokenizer="t5-base/spiece.model")  # released VeCLIP weights
    img = model.encode_image([PIL.Image.open("cat.jpg"), uint8_hwc_array])   # [2, D], L2-normalised numpy
    txt = model.encode_text(["a photo of a cat", "a dog"])                   # [2, D]
    probs = softmax(model.logit_scale * img @ txt.T)

`model.preprocess(image)` (any size -> float32 [S, S, 3], normalised) and
`model.tokenize(texts)` (-> int32 [n, context_length]) are the two steps
`encode_*` apply, for use in your own pipelines. Preprocessing: for our runs,
the evaluation transform (shorter side to S, bicubic, centre crop, CLIP
mean/std: what an exported model's CLIPImageProcessor does); for a HF
directory, what its preprocessor_config.json says; for a directory without
one (the released VeCLIP checkpoints), VeCLIP's own (TF-style bilinear resize
without antialiasing, centre crop).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from veclip_jax.data.image_ops import CLIP_MEAN, CLIP_STD, EvalPreprocess
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer, is_hf_tokenizer_dir, load_tokenizer
from veclip_jax.eval.encoders import Encoders
from veclip_jax.models.clip import CLIP, build_model
from veclip_jax.train.state import abstract_params

log = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray


@dataclasses.dataclass
class LoadedCLIP:
    """A CLIP model with its tokenizer and preprocessing (see the module doc)."""

    model: CLIP
    params: Any
    model_config: ml_collections.ConfigDict
    tokenizer: Tokenizer | HFTokenizer
    preprocess: EvalPreprocess
    source: str  # what was loaded (a checkpoint step directory or a HF directory)
    batch_size: int = 64

    def __post_init__(self) -> None:
        from veclip_jax.parallel.mesh import make_mesh, replicated

        mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), [jax.devices()[0]])
        shardings = jax.tree.map(lambda _: replicated(mesh), self.params)
        self.params = jax.device_put(self.params, shardings)
        self._encoders = Encoders(self.model, mesh, shardings, self.batch_size)

    @property
    def logit_scale(self) -> float:
        """exp(learned temperature), clipped as in training: multiply cosine similarities by it."""
        raw = float(np.asarray(self.params["logit_scale"]))
        return math.exp(min(raw, math.log(self.model.logit_scale_max)))

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        """int32 [n, context_length] token rows, end-of-text and padding included."""
        return self.tokenizer.encode_batch([texts] if isinstance(texts, str) else list(texts))

    def encode_text(self, texts: Sequence[str] | str) -> np.ndarray:
        """float32 [n, embed_dim], L2-normalised."""
        return self._encoders.texts(self.params, self.tokenize(texts))

    def encode_image(self, images: Sequence[ImageLike] | ImageLike) -> np.ndarray:
        """float32 [n, embed_dim], L2-normalised, from PIL images or uint8 [H, W, 3] arrays of any size.

        A uint8 array [n, H, W, 3] is a batch of n images.
        """
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        if not len(images):
            return np.zeros((0, self.model.embed_dim), np.float32)
        return self._encoders.images(self.params, np.stack([self.preprocess(im) for im in images]))


def _find_workdir_tokenizer(checkpoint_dir: str) -> str:
    """The tokenizer a run kept in its workdir (spiece.model or tokenizer/), above its checkpoints."""
    from veclip_jax.train.loop import TOKENIZER_DIR, TOKENIZER_FILE

    d = os.path.abspath(checkpoint_dir)
    for _ in range(3):  # step dir -> checkpoints -> workdir
        d = os.path.dirname(d)
        for name in (TOKENIZER_FILE, TOKENIZER_DIR):
            if os.path.exists(os.path.join(d, name)):
                return os.path.join(d, name)
    raise FileNotFoundError(f"no tokenizer next to {checkpoint_dir}: pass tokenizer=PATH")


def _load_ours(path: str, step: int | None, tokenizer: str | None, batch_size: int) -> LoadedCLIP:
    from veclip_jax.train.checkpoint import read_metadata, restore_params

    meta = read_metadata(path, step)
    model_cfg = ml_collections.ConfigDict(meta["config"]["model"])
    model = build_model(model_cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params(model)
    )
    params, meta = restore_params(path, abstract, step=meta["step"])
    t = model_cfg.text
    tok = load_tokenizer(
        tokenizer or _find_workdir_tokenizer(meta["checkpoint"]),
        t.context_length,
        pad_id=t.pad_id,
        eos_id=t.eos_id,
    )
    size = model_cfg.vision.image_size
    return LoadedCLIP(
        model, params, model_cfg, tok, EvalPreprocess(size, size), meta["checkpoint"], batch_size
    )


def hf_preprocess(hf_dir: str, image_size: int) -> EvalPreprocess:
    """The preprocessing of a HF CLIP directory: its preprocessor_config.json, else VeCLIP's."""
    path = os.path.join(hf_dir, "preprocessor_config.json")
    processor = os.path.join(hf_dir, "processor_config.json")  # transformers 5 may keep it here instead
    p = {}
    if os.path.exists(path):
        with open(path) as f:
            p = json.load(f)
    elif os.path.exists(processor):
        with open(processor) as f:
            p = json.load(f).get("image_processor", {})
    if not p:
        log.info("%s has no image processor config: VeCLIP's (TF bilinear, centre crop)", hf_dir)
        return EvalPreprocess(image_size, image_size, "tf_bilinear")
    size = p.get("size", {"shortest_edge": image_size})
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else int(size)
    crop = p.get("crop_size", image_size)
    crop = crop.get("height") if isinstance(crop, dict) else int(crop)
    if not p.get("do_center_crop", True):
        crop = size
    method = {2: "bilinear", 3: "bicubic"}.get(int(p.get("resample", 3)))
    if method is None:
        raise ValueError(f"{path}: resample={p.get('resample')} is not bilinear (2) or bicubic (3)")
    mean = tuple(p.get("image_mean", CLIP_MEAN))
    std = tuple(p.get("image_std", CLIP_STD))
    return EvalPreprocess(int(size), int(crop), method, mean, std)


def import_hf(
    hf_dir: str, tokenizer: str | None = None
) -> tuple[ml_collections.ConfigDict, dict[str, Any], Tokenizer | HFTokenizer]:
    """(our model config, numpy parameters, tokenizer) of a HF CLIP directory.

    The tokenizer is `tokenizer` (a sentencepiece model file or a HF tokenizer
    directory) or the one `hf_dir` holds. The text is pooled where HF pools
    it: at the first `eos_token_id`, or (HF's legacy rule when that id is 2)
    at the highest id, which is the tokenizer's end-of-text for OpenAI's BPE.
    """
    import transformers

    from veclip_jax.export.hf import load_hf_state_dict, model_config_from_hf, params_from_hf

    hf_dir = os.path.expanduser(hf_dir)
    hf_cfg = transformers.CLIPConfig.from_pretrained(hf_dir)
    text = hf_cfg.text_config
    tok_path = tokenizer or (hf_dir if is_hf_tokenizer_dir(hf_dir) else None)
    if tok_path is None:
        raise FileNotFoundError(
            f"{hf_dir} holds no tokenizer: pass tokenizer= (the released VeCLIP checkpoints use T5's "
            "sentencepiece model, spiece.model of t5-base)"
        )
    if is_hf_tokenizer_dir(tok_path):
        eos = transformers.AutoTokenizer.from_pretrained(tok_path).eos_token_id
        if text.eos_token_id != 2 and text.eos_token_id != eos:
            raise ValueError(f"{hf_dir} pools at eos_token_id {text.eos_token_id}; its tokenizer's is {eos}")
        if text.eos_token_id == 2 and eos != text.vocab_size - 1:
            log.warning("HF pools at the highest token id (eos_token_id=2); the tokenizer's end-of-text %d "
                        "is not the highest id: embeddings may differ from HF's", eos)  # fmt: skip
        tok = HFTokenizer(tok_path, text.max_position_embeddings, eos_id=eos)
        pad = tok.pad_id
    else:
        eos = text.eos_token_id
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        tok = Tokenizer(tok_path, text.max_position_embeddings, pad_id=pad, eos_id=eos)
    model_cfg = model_config_from_hf(hf_cfg, eos_id=eos, pad_id=pad)
    params = params_from_hf(load_hf_state_dict(hf_dir), abstract_params(build_model(model_cfg)))
    return model_cfg, params, tok


def load(
    path: str,
    *,
    tokenizer: str | None = None,
    step: int | None = None,
    batch_size: int = 64,
) -> LoadedCLIP:
    """A model to embed images and texts with (see the module doc).

    Args:
      path: a training workdir, its checkpoints directory or one step's
        directory (the newest step unless `step`), or a HF CLIP directory.
      tokenizer: a sentencepiece model or HF tokenizer directory, for a HF
        directory without one (or to override the one found).
      batch_size: images or texts per compiled encoding call.
    """
    from veclip_jax.export.hf import is_hf_clip_dir

    path = os.path.expanduser(path)
    if is_hf_clip_dir(path):
        model_cfg, params, tok = import_hf(path, tokenizer)
        model = build_model(model_cfg)
        preprocess = hf_preprocess(path, model_cfg.vision.image_size)
        return LoadedCLIP(model, params, model_cfg, tok, preprocess, os.path.abspath(path), batch_size)
    return _load_ours(path, step, tokenizer, batch_size)
