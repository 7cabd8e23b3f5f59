"""Import open_clip checkpoints: `veclip_jax.load(DIR)`, `launch/eval.py --model=DIR`, `config.init_from`.

Accepted:
  * a `local-dir` layout: open_clip_config.json (`model_cfg`, `preprocess_cfg`) beside
    open_clip_model.safetensors (or open_clip_pytorch_model.{safetensors,bin,pth});
  * a bare state dict (`.safetensors`, `.bin`, `.pt`, `.pth`), or a directory holding only one of the
    weight files, with `model_name` naming open_clip's model config (`RN50`, `RN50-quickgelu`,
    `ViT-B-32`, ...: read from the installed package's JSON files, open_clip never imported).
    OpenAI's weights (ResNet or ViT) as open_clip stores them are such a state dict; they were trained
    with QuickGELU, so name the `-quickgelu` config (open_clip's plain `RN50` uses erf GELU).
A pickle is read only with torch's weights_only loader (veclip_jax/openclip/weights.py).

The tokenizer: `tokenizer` if given; else the directory's transformers tokenizer when its config
names one (`hf_tokenizer_name`, e.g. our T5 export); else CLIP's BPE (`clip_bpe`, open_clip's
SimpleTokenizer ids). Preprocessing: the `preprocess_cfg`, else open_clip's defaults (bicubic,
shorter side, centre crop, OpenAI's mean/std).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from veclip_jax.data.image_ops import EvalPreprocess
from veclip_jax.openclip.config import (
    CONFIG_FILE,
    WEIGHT_FILES,
    OpenClipError,
    image_stats_from_cfg,
    model_config_from_open_clip,
    packaged_model_cfg,
    preprocess_from_cfg,
    read_config_file,
)

STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclasses.dataclass
class OpenClipCheckpoint:
    """What an open_clip checkpoint gives: our model section, numpy parameters and model state, the
    tokenizer and the preprocessing."""

    model_config: ml_collections.ConfigDict
    params: Any
    model_state: dict[str, Any]
    tokenizer: Any
    preprocess: EvalPreprocess
    source: str  # the local-dir, or the bare state dict file


def is_open_clip_dir(path: str) -> bool:
    """A directory with open_clip_config.json, or with one of open_clip's weight file names."""
    path = os.path.expanduser(path)
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in (CONFIG_FILE, *WEIGHT_FILES)
    )


def is_state_dict_file(path: str) -> bool:
    """A file whose name says it is a state dict (open_clip's or OpenAI's)."""
    path = os.path.expanduser(path)
    return os.path.isfile(path) and path.endswith(STATE_DICT_SUFFIXES)


def is_open_clip(path: str) -> bool:
    """Whether `path` is an open_clip checkpoint this module reads (a local-dir or a bare state dict)."""
    return is_open_clip_dir(path) or is_state_dict_file(path)


def _weights_file(directory: str) -> str:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise OpenClipError(f"{directory} holds {CONFIG_FILE} but no weights ({', '.join(WEIGHT_FILES)})")


def resolve(
    path: str, model_name: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], str, str | None]:
    """(open_clip model_cfg, preprocess_cfg, weights file, directory or None) of a checkpoint."""
    path = os.path.expanduser(path)
    directory = path if os.path.isdir(path) else None
    config = os.path.join(path, CONFIG_FILE) if directory else None
    if config and os.path.isfile(config):
        data = read_config_file(config)
        if model_name:
            raise OpenClipError(
                f"{path} has its own {CONFIG_FILE}: --model_name={model_name} is not used "
                "with it (drop --model_name)"
            )
        return data["model_cfg"], data.get("preprocess_cfg") or {}, _weights_file(path), directory
    weights = _weights_file(path) if directory else path
    if not model_name:
        raise OpenClipError(
            f"{weights} is a bare state dict: name its open_clip model config with "
            "--model_name (model_name=), e.g. RN50-quickgelu or ViT-B-32"
        )
    return packaged_model_cfg(model_name), {}, weights, directory


def _tokenizer(tokenizer: str | None, directory: str | None, model_cfg: Any, hf_name: bool) -> Any:
    from veclip_jax.data.tokenizer import HFTokenizer, is_hf_tokenizer_dir, load_tokenizer

    t = model_cfg.text
    if tokenizer:
        return load_tokenizer(tokenizer, t.context_length, pad_id=t.pad_id, eos_id=t.eos_id)
    if hf_name:
        if not directory or not is_hf_tokenizer_dir(directory):
            raise OpenClipError(
                f"the open_clip config names a transformers tokenizer (hf_tokenizer_name) "
                f"that {directory or 'a bare file'} does not hold: pass tokenizer="
            )
        return HFTokenizer(directory, t.context_length, eos_id=t.eos_id)
    from veclip_jax.data.bpe import NAME

    return load_tokenizer(NAME, t.context_length, pad_id=t.pad_id, eos_id=t.eos_id)


def import_open_clip(
    path: str, *, model_name: str | None = None, tokenizer: str | None = None
) -> OpenClipCheckpoint:
    """An open_clip checkpoint (the module doc) as our model config, parameters and model state,
    tokenizer and preprocessing. OpenClipError names what does not fit."""
    from veclip_jax.objectives.model import abstract_model_state, abstract_params, build
    from veclip_jax.openclip.weights import params_from_open_clip, read_state_dict

    oc_cfg, pre, weights, directory = resolve(path, model_name)
    model_cfg = model_config_from_open_clip(oc_cfg, source=model_name or os.path.join(path, CONFIG_FILE))
    # Its transform's mean/std: the model's, applied inside its jitted computation (models/clip.py).
    model_cfg.vision.image_mean, model_cfg.vision.image_std = image_stats_from_cfg(pre)
    hf_name = bool(oc_cfg.get("text_cfg", {}).get("hf_tokenizer_name"))
    tok = _tokenizer(tokenizer, directory, model_cfg, hf_name)
    if not hf_name and hasattr(tok, "pad_id"):
        model_cfg.text.pad_id = int(tok.pad_id)
    model = build(model_cfg)
    params, model_state = params_from_open_clip(
        read_state_dict(weights), abstract_params(model), abstract_model_state(model), model_cfg
    )
    preprocess = preprocess_from_cfg(pre, model_cfg.vision.image_size, source=weights)
    source = os.path.abspath(directory or weights)  # what evaluation names its results after
    return OpenClipCheckpoint(model_cfg, params, model_state, tok, preprocess, source)


def check_same_model(path: str, model_cfg: Any) -> None:
    """OpenClipError naming the first `config.model` field that differs from a local-dir's config
    (a bare state dict has none: its tensors' shapes are checked when read)."""
    try:
        oc_cfg, _, _, _ = resolve(path)
    except OpenClipError:
        return  # a bare state dict: checked tensor by tensor in import_params
    theirs = model_config_from_open_clip(oc_cfg, source=path)
    kind = model_cfg.vision.get("type", "vit")
    if theirs.vision.type != kind:
        raise OpenClipError(f"config.model.vision.type={kind!r} but {path} has {theirs.vision.type!r}")
    vision = ("image_size", "width", "heads") + (
        ("resnet_layers",) if kind == "resnet" else ("patch_size", "layers", "mlp_dim")
    )
    for section, fields in (
        ("vision", vision),
        ("text", ("vocab_size", "context_length", "width", "layers", "heads", "mlp_dim", "eos_id")),
    ):
        for f in fields:
            ours, oc = model_cfg[section][f], theirs[section][f]
            if (tuple(ours) if f == "resnet_layers" else ours) != oc:
                raise OpenClipError(f"config.model.{section}.{f}={ours} but {path} has {oc}")
    for f in ("embed_dim", "act", "layer_norm_eps"):
        if model_cfg[f] != theirs[f]:
            raise OpenClipError(f"config.model.{f}={model_cfg[f]!r} but {path} has {theirs[f]!r}")


def import_params(
    path: str, placement: Any, state_placement: Any, model_cfg: Any
) -> tuple[Any, dict[str, Any]]:
    """(towers' parameters, model state) of an open_clip checkpoint, placed as the ShapeDtypeStructs
    with shardings say (config.init_from: the shapes are config.model's)."""
    import jax

    from veclip_jax.openclip.weights import params_from_open_clip, read_state_dict

    path = os.path.expanduser(path)
    weights = _weights_file(path) if os.path.isdir(path) else path
    params, state = params_from_open_clip(read_state_dict(weights), placement, state_placement, model_cfg)
    put = lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda idx: x[idx])
    return jax.tree.map(put, params, placement), jax.tree.map(put, state, state_placement)
