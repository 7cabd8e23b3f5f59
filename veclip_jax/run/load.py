"""A model with its tokenizer and preprocessing, from a run of ours or a HuggingFace CLIP directory.

What `veclip_jax.load` (veclip_jax/api.py) and standalone evaluation
(veclip_jax/eval/run.py) load, without the trainer or the evaluation package.
Preprocessing: for our runs, the evaluation transform (shorter side to S,
bicubic, centre crop, CLIP mean/std: what an exported model's
CLIPImageProcessor does); for a HF directory, what its
preprocessor_config.json says; for a directory without one (the released
VeCLIP checkpoints), VeCLIP's own (TF-style bilinear resize without
antialiasing, centre crop).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from veclip_jax.data.image_ops import EvalPreprocess
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from veclip_jax.hf.from_hf import hf_preprocess, import_hf, is_hf_clip_dir
from veclip_jax.objectives.model import ObjectiveModel, build
from veclip_jax.run.checkpoint import load_trained_params
from veclip_jax.run.workdir import find_tokenizer


@dataclasses.dataclass
class LoadedModel:
    """A model, its parameters (on one device) and the tokenizer and preprocessing it was trained with."""

    model: ObjectiveModel  # the towers with the run's objective (its heads: FILIP's token space)
    params: Any
    model_config: ml_collections.ConfigDict
    tokenizer: Tokenizer | HFTokenizer
    preprocess: EvalPreprocess
    source: str  # what was loaded (a checkpoint step directory or a HF directory)
    # The towers' other variable collections: {"batch_stats": ...} (a ResNet's BatchNorm running
    # averages, used at evaluation), {} for the ViT. Apply with {"params": params, **model_state}.
    model_state: dict = dataclasses.field(default_factory=dict)


def _load_ours(path: str, step: int | None, tokenizer: str | None) -> LoadedModel:
    trained = load_trained_params(path, step)
    cfg = trained.model_config
    tok = load_tokenizer(
        tokenizer or find_tokenizer(trained.checkpoint),
        cfg.text.context_length,
        pad_id=cfg.text.pad_id,
        eos_id=cfg.text.eos_id,
    )
    size = cfg.vision.image_size
    preprocess = EvalPreprocess(size, size)
    # With the run's objective: its heads are in the parameters, and a FILIP run is evaluated through
    # them (token-wise, veclip_jax/eval/tokenwise.py).
    model = build(cfg, trained.objective)
    return LoadedModel(model, trained.params, cfg, tok, preprocess, trained.checkpoint, trained.model_state)


def load_model(
    path: str, *, tokenizer: str | None = None, step: int | None = None, model_name: str | None = None
) -> LoadedModel:
    """The model at `path`: a training workdir, its checkpoints directory or one step's directory
    (the newest step unless `step`), a HF CLIP directory, or an open_clip checkpoint (a local-dir, or
    a bare state dict with `model_name`, veclip_jax/openclip/load.py). `tokenizer`: a sentencepiece
    model or HF tokenizer directory, for a HF directory without one (or to override the one found)."""
    path = os.path.expanduser(path)
    # An open_clip local-dir or bare state dict (`model_name`: its open_clip model config, e.g. RN50).
    from veclip_jax.openclip.load import import_open_clip, is_open_clip

    if model_name or is_open_clip(path):
        oc = import_open_clip(path, model_name=model_name, tokenizer=tokenizer)
        model = build(oc.model_config)
        return LoadedModel(
            model, oc.params, oc.model_config, oc.tokenizer, oc.preprocess, oc.source, oc.model_state
        )
    if is_hf_clip_dir(path):
        model_cfg, params, tok = import_hf(path, tokenizer)
        model = build(model_cfg)
        preprocess = hf_preprocess(path, model_cfg.vision.image_size)
        return LoadedModel(model, params, model_cfg, tok, preprocess, os.path.abspath(path))
    return _load_ours(path, step, tokenizer)
