"""Export to an open_clip `local-dir` directory: `open_clip.create_model_and_transforms("local-dir:DIR")`.

    python launch/export.py --checkpoint=WORKDIR --out=DIR --format=open_clip [--step=N] [--force]

DIR holds open_clip_config.json (`model_cfg`, `preprocess_cfg`: our evaluation transform, shorter
side to the image size, bicubic, centre crop, CLIP mean/std), open_clip_model.safetensors, and the
tokenizer: our sentencepiece model as a transformers T5 tokenizer (or a run's HF tokenizer
directory), which open_clip's `get_tokenizer("local-dir:DIR")` loads through `hf_tokenizer_name`;
for CLIP's BPE (`clip_bpe`) nothing, as open_clip's own SimpleTokenizer gives the same ids. ViT and
ResNet towers (a ResNet's BatchNorm running averages are its `running_mean` / `running_var`).

The objective's own parameters have no place in open_clip's CLIP, except SigLIP's bias, which is
its `logit_bias`: the others are dropped, listed under "veclip" in open_clip_config.json (which
open_clip ignores), and logged. The directory is written beside `out` and renamed into place, with
the HF export's helpers (veclip_jax/hf/to_hf.py: the same --force and stale-temporary rules).

open_clip cleans text before tokenising (ftfy, HTML unescaping, whitespace runs to one space); a
T5-vocabulary model gives our ids for any text that cleaning leaves unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from veclip_jax.data.image_ops import CLIP_MEAN, CLIP_STD, EvalPreprocess
from veclip_jax.hf.to_hf import (
    check_output,
    hf_tokenizer,
    objective_heads,
    objective_params,
    publishing,
    read_export_source,
)
from veclip_jax.openclip.config import (
    CLIP_BPE_EOS,
    CONFIG_FILE,
    WEIGHTS,
    OpenClipError,
    check_expressible,
    open_clip_model_cfg,
    preprocess_cfg,
)
from veclip_jax.openclip.weights import params_to_open_clip

log = logging.getLogger(__name__)

# What open_clip_config.json says about objectives whose training open_clip's CLIP cannot reproduce.
NOTES = {
    "filip": (
        "Trained with FILIP's token-wise late-interaction loss (image patches x caption tokens). open_clip's "
        "CLIP scores pooled embeddings, which FILIP trains only through objective.filip.clip_weight (0 in "
        "the toolkit's recipe); FILIP's token mappings and temperature are not exported."
    ),
}


def _tokenizer_kind(tokenizer: Any) -> str:
    """ "clip_bpe" (open_clip's own SimpleTokenizer), "hf" (a transformers tokenizer we save)."""
    from veclip_jax.data.bpe import ClipBpeTokenizer

    if isinstance(tokenizer, ClipBpeTokenizer):
        return "clip_bpe"
    return "hf"


def save_open_clip_directory(
    out: str,
    params: Any,
    model_cfg: Any,
    tokenizer: Any,
    *,
    model_state: dict[str, Any] | None = None,
    force: bool = False,
    objective: str = "clip",
) -> str:
    """Writes an open_clip local-dir directory for our parameters and tokenizer; returns its path.

    `params`/`model_state` are numpy trees (the model state: a ResNet's {"batch_stats": ...});
    `tokenizer` is the run's (veclip_jax.data.tokenizer). OpenClipError, before anything is
    written, for what open_clip cannot hold (veclip_jax/openclip/config.py).
    """
    import safetensors.numpy

    out = os.path.abspath(os.path.expanduser(out))
    check_output(out, force=force)
    check_expressible(model_cfg)
    kind = _tokenizer_kind(tokenizer)
    if kind == "clip_bpe" and (model_cfg.text.eos_id, model_cfg.text.pad_id) != (CLIP_BPE_EOS, 0):
        raise OpenClipError(
            f"CLIP's BPE ends texts with {CLIP_BPE_EOS} and pads with 0; config.model.text has "
            f"eos_id={model_cfg.text.eos_id}, pad_id={model_cfg.text.pad_id}"
        )
    own = objective_params(params)
    bias = own.pop("bias", None) if objective == "siglip" else None
    # CLIP's BPE in its own 49,408 ids: "argmax" (open_clip's default, as OpenAI's configs); otherwise
    # (T5's vocabulary, DeCLIP's extra mask token) the first `eos_id`: "eos".
    plain_bpe = kind == "clip_bpe" and model_cfg.text.vocab_size == CLIP_BPE_EOS + 1
    cfg = open_clip_model_cfg(
        model_cfg,
        hf_tokenizer=kind == "hf",
        pool_type="argmax" if plain_bpe else "eos",
        logit_bias=bias,
    )
    size = model_cfg.vision.image_size
    veclip: dict[str, Any] = {"objective": objective}
    if own:
        veclip["objective_params"] = own  # e.g. a bias open_clip has no place for
    if objective_heads(params):
        veclip["dropped_heads"] = objective_heads(params)
        log.info(
            "export: dropping the objective's own heads (not in open_clip's CLIP): %s",
            veclip["dropped_heads"],
        )
    if objective in NOTES:
        veclip["notes"] = NOTES[objective]
        log.warning("export: %s", NOTES[objective])
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": preprocess_cfg(
            EvalPreprocess(size, size),
            model_cfg.vision.get("image_mean", CLIP_MEAN),
            model_cfg.vision.get("image_std", CLIP_STD),
        ),
        "veclip": veclip,
    }
    tensors = params_to_open_clip(params, model_state, model_cfg)
    if bias is not None:
        tensors["logit_bias"] = np.asarray(bias, np.float32)
    hf_tok = hf_tokenizer(tokenizer, model_cfg.text.context_length) if kind == "hf" else None

    with publishing(out) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        if hf_tok is not None:
            hf_tok.save_pretrained(tmp)
    return out


def export_open_clip(checkpoint: str, out: str, *, step: int | None = None, force: bool = False) -> str:
    """A workdir / checkpoint of ours -> an open_clip local-dir directory at `out`."""
    src = read_export_source(checkpoint, out, step=step, force=force, check=check_expressible)
    return save_open_clip_directory(
        out,
        src.trained.params,
        src.trained.model_config,
        src.tokenizer,
        model_state=src.trained.model_state,
        force=force,
        objective=src.trained.objective.name,
    )
