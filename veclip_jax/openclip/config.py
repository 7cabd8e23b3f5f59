"""Our `config.model` <-> open_clip's `model_cfg`, our eval transform <-> its `preprocess_cfg`.

open_clip's `CLIP(**model_cfg)` builds what our towers are when its config says so:
  * text pooling: ours takes the *first* end-of-text position (`argmax(tokens == eos_id)`), which
    is open_clip's `pool_type="eos"` with `eos_id`; its default "argmax" (the highest id) is the same
    rule for CLIP's BPE, whose end-of-text 49407 is the highest id its tokenizer writes;
  * activation: `quick_gelu` true (OpenAI's x*sigmoid(1.702x)) or false (torch's exact-erf GELU,
    our "gelu"); LayerNorm eps through `norm_kwargs` when it is not torch's 1e-5;
  * heads through `head_width` (vision: width // head_width; ResNet: width * 32 // head_width), the
    MLP through `mlp_ratio` (int(width * ratio) must give our mlp_dim);
  * no projection bias, a learned scalar `logit_scale`; SigLIP's bias as `init_logit_bias`.
What it cannot hold is refused with the reason (`OpenClipError`), before anything is written or built.

Its packaged model configs (`RN50`, `ViT-B-32`, ...) are read as JSON from the installed package's
folder (`importlib.util.find_spec`): open_clip itself is never imported (its import needs torchvision).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from veclip_jax import defaults
from veclip_jax.data.image_ops import CLIP_MEAN, CLIP_STD, EvalPreprocess
from veclip_jax.errors import UserError

CONFIG_FILE = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"  # what the export writes
# What open_clip's local-dir loader looks for, in its order of preference (factory.py).
WEIGHT_FILES = (
    WEIGHTS,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, what open_clip uses without norm_kwargs
CLIP_BPE_EOS = 49407  # <end_of_text> of open_clip's SimpleTokenizer


class OpenClipError(UserError, ValueError):
    """An open_clip config or checkpoint that cannot be (or hold) our model: the reason named (exit 2)."""


# --- export ----------------------------------------------------------------------------------------


def _mlp_ratio(width: int, mlp_dim: int, where: str) -> float:
    """A ratio that open_clip's int(width * ratio) turns back into mlp_dim exactly."""
    for ratio in (mlp_dim / width, (mlp_dim + 0.5) / width):
        if int(width * ratio) == mlp_dim:
            return ratio
    raise OpenClipError(
        f"config.model.{where}.mlp_dim={mlp_dim}: open_clip's int(width * mlp_ratio) "
        f"cannot give it for width {width}"
    )


def check_expressible(model_cfg: Any) -> None:
    """Raises OpenClipError (the field and why) for a model open_clip's CLIP cannot build."""
    v = model_cfg.vision
    kind = v.get("type", "vit")
    if kind not in ("vit", "resnet"):
        raise OpenClipError(
            f"config.model.vision.type={kind!r}: only 'vit' and 'resnet' have open_clip towers"
        )
    if model_cfg.act not in ("quick_gelu", "gelu"):
        raise OpenClipError(f"config.model.act={model_cfg.act!r}: open_clip has quick_gelu or erf GELU only")
    if kind == "resnet":
        if (v.width * 32) % v.heads or (v.width * 32) // ((v.width * 32) // v.heads) != v.heads:
            raise OpenClipError(
                f"config.model.vision.heads={v.heads}: open_clip's ModifiedResNet derives its attention-pool "
                f"heads as width * 32 // head_width, which cannot give {v.heads} for width {v.width}"
            )
    elif v.width % v.heads:
        raise OpenClipError(f"config.model.vision.heads={v.heads} does not divide width {v.width}")
    _mlp_ratio(model_cfg.text.width, model_cfg.text.mlp_dim, "text")
    if kind == "vit":
        _mlp_ratio(v.width, v.mlp_dim, "vision")


def open_clip_model_cfg(
    model_cfg: Any, *, hf_tokenizer: bool, pool_type: str, logit_bias: float | None = None
) -> dict[str, Any]:
    """open_clip's `model_cfg` for our model section (`check_expressible` first).

    `hf_tokenizer`: the directory holds a transformers tokenizer (our sentencepiece model as T5's,
    or a HF tokenizer directory) that open_clip's `get_tokenizer("local-dir:DIR")` loads; otherwise
    open_clip's own SimpleTokenizer (CLIP's BPE). `pool_type`: "eos" or "argmax" (the module doc).
    """
    check_expressible(model_cfg)
    v, t = model_cfg.vision, model_cfg.text
    norm = (
        {} if model_cfg.layer_norm_eps == TORCH_LN_EPS else {"norm_kwargs": {"eps": model_cfg.layer_norm_eps}}
    )
    if v.get("type", "vit") == "resnet":
        vision = dict(
            image_size=v.image_size,
            layers=[int(n) for n in v.resnet_layers],
            width=v.width,
            head_width=(v.width * 32) // v.heads,
            patch_size=None,
        )
    else:
        vision = dict(
            image_size=v.image_size,
            layers=v.layers,
            width=v.width,
            head_width=v.width // v.heads,
            mlp_ratio=_mlp_ratio(v.width, v.mlp_dim, "vision"),
            patch_size=v.patch_size,
            **norm,
        )
    text = dict(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        mlp_ratio=_mlp_ratio(t.width, t.mlp_dim, "text"),
        pool_type=pool_type,
        eos_id=t.eos_id,
        pad_id=t.pad_id,
        **norm,
    )
    if hf_tokenizer:
        # Any non-empty name: for "local-dir:DIR" open_clip loads the tokenizer saved in DIR itself
        # (factory.get_tokenizer). Pushed to the HF hub, set it to the repository's id.
        text["hf_tokenizer_name"] = "local-dir"
    cfg: dict[str, Any] = dict(
        embed_dim=model_cfg.embed_dim,
        quick_gelu=model_cfg.act == "quick_gelu",
        vision_cfg=vision,
        text_cfg=text,
    )
    if logit_bias is not None:
        cfg["init_logit_bias"] = float(logit_bias)
    return cfg


def preprocess_cfg(
    preprocess: EvalPreprocess,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> dict[str, Any]:
    """open_clip's `preprocess_cfg` for our evaluation transform (shorter side, centre crop) and the
    model's image statistics (config.model.vision.image_mean / image_std: our model applies them in
    its jitted computation, open_clip's transform on the host)."""
    if preprocess.method not in ("bicubic", "bilinear") or preprocess.size != preprocess.crop:
        raise OpenClipError(
            f"preprocessing {preprocess}: open_clip resizes the shorter side to the crop "
            "size (bicubic or bilinear) and centre-crops"
        )
    return dict(
        size=preprocess.crop,
        mode="RGB",
        mean=[float(x) for x in mean],
        std=[float(x) for x in std],
        interpolation=preprocess.method,
        resize_mode="shortest",
        fill_color=0,
    )


# --- import ----------------------------------------------------------------------------------------

# open_clip config fields that change nothing we compute (training-only, or outputs we do not ask for),
# and those whose value must be the given default (anything else changes the model).
_IGNORED = {
    "patch_dropout",
    "output_tokens",
    "final_ln_after_pool",
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "timm_model_pretrained",
    "hf_model_pretrained",
}
_DEFAULTS = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "act_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "timm_model_name": None,
    "hf_model_name": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "proj_bias": False,
    "proj_type": "linear",
}
# final_ln_after_pool: LayerNorm is per position, so normalising the pooled token or every token
# before pooling gives the same pooled features.


def _eps(section: dict, where: str) -> float:
    kwargs = section.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise OpenClipError(f"{where}.norm_kwargs={kwargs}: only eps is supported")
    return float(kwargs.get("eps", TORCH_LN_EPS))


def _square(x: Any, where: str) -> int:
    if isinstance(x, list | tuple):
        if len(set(x)) != 1:
            raise OpenClipError(f"{where}={x}: only square images are supported")
        x = x[0]
    return int(x)


def _check_fields(section: dict, where: str, known: set[str]) -> None:
    for key, value in section.items():
        if key in known or key in _IGNORED:
            continue
        if key in _DEFAULTS:
            if value != _DEFAULTS[key] and not (key == "block_type" and value == "default"):
                raise OpenClipError(
                    f"{where}.{key}={value!r}: our towers have no such variant (only {_DEFAULTS[key]!r})"
                )
            continue
        raise OpenClipError(f"{where}.{key}={value!r}: an open_clip option our towers do not implement")


def model_config_from_open_clip(cfg: dict[str, Any], *, source: str) -> ml_collections.ConfigDict:
    """Our `config.model` section for open_clip's `model_cfg` (OpenClipError for what we cannot build).

    `text.eos_id` is where the text is pooled: the config's eos_id for pool_type "eos", CLIP's BPE
    end-of-text (49407, its highest id) for "argmax"; `text.pad_id` is the config's pad_id.
    """
    where = f"{source}: model_cfg"
    _check_fields(
        {k: v for k, v in cfg.items() if k not in ("vision_cfg", "text_cfg")},
        where,
        {"embed_dim", "quick_gelu", "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale"},
    )
    if cfg.get("custom_text") or "multimodal_cfg" in cfg:
        raise OpenClipError(f"{where}: custom_text / multimodal_cfg (CustomTextCLIP, CoCa) are not supported")
    v, t = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    _check_fields(
        v,
        f"{where}.vision_cfg",
        {
            "image_size",
            "layers",
            "width",
            "head_width",
            "mlp_ratio",
            "patch_size",
            "norm_kwargs",
            "pool_type",
        },
    )
    _check_fields(
        t,
        f"{where}.text_cfg",
        {
            "context_length",
            "vocab_size",
            "width",
            "heads",
            "layers",
            "mlp_ratio",
            "pad_id",
            "eos_id",
            "pool_type",
            "norm_kwargs",
        },
    )
    if v.get("pool_type", "tok") != "tok":
        raise OpenClipError(f"{where}.vision_cfg.pool_type={v['pool_type']!r}: our ViT pools its class token")
    pool = t.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise OpenClipError(
            f"{where}.text_cfg.pool_type={pool!r}: our text tower pools at the first "
            "end-of-text token ('eos', or 'argmax' with CLIP's BPE)"
        )
    vit_eps, text_eps = _eps(v, f"{where}.vision_cfg"), _eps(t, f"{where}.text_cfg")
    m = defaults.model_config("tiny")
    m.size = "open_clip"
    width = int(v.get("width", 768))
    layers = v.get("layers", 12)
    head_width = int(v.get("head_width", 64))
    image_size = _square(v.get("image_size", 224), f"{where}.vision_cfg.image_size")
    if isinstance(layers, list | tuple):
        if len(layers) != 4:
            raise OpenClipError(f"{where}.vision_cfg.layers={layers}: a ModifiedResNet has 4 stages")
        m.vision.update(
            type="resnet",
            resnet_layers=tuple(int(n) for n in layers),
            width=width,
            heads=width * 32 // head_width,
            image_size=image_size,
        )
        eps = text_eps  # the ResNet has BatchNorm (torch's eps), no LayerNorm
    else:
        if vit_eps != text_eps:
            raise OpenClipError(f"{where}: the towers' LayerNorm eps differ ({vit_eps}, {text_eps})")
        eps = vit_eps
        m.vision.update(
            type="vit",
            image_size=image_size,
            width=width,
            layers=int(layers),
            heads=width // head_width,
            mlp_dim=int(width * float(v.get("mlp_ratio", 4.0))),
            patch_size=_square(v.get("patch_size", 16), f"{where}.vision_cfg.patch_size"),
        )
    tw = int(t.get("width", 512))
    eos = int(t.get("eos_id", 2)) if pool == "eos" else CLIP_BPE_EOS
    m.text.update(
        context_length=int(t.get("context_length", 77)),
        vocab_size=int(t.get("vocab_size", 49408)),
        width=tw,
        heads=int(t.get("heads", 8)),
        layers=int(t.get("layers", 12)),
        mlp_dim=int(tw * float(t.get("mlp_ratio", 4.0))),
        eos_id=eos,
        pad_id=int(t.get("pad_id", 0)),
    )
    if pool == "argmax" and m.text.vocab_size - 1 != CLIP_BPE_EOS:
        raise OpenClipError(
            f"{where}.text_cfg: pool_type 'argmax' pools at the highest id, which is our "
            f"first end-of-text only for CLIP's BPE (vocab 49408), not vocab_size "
            f"{m.text.vocab_size}"
        )
    m.embed_dim = int(cfg.get("embed_dim", 512))
    m.act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    m.layer_norm_eps = eps
    m.logit_scale_init = float(cfg.get("init_logit_scale", math.log(1 / 0.07)))
    return m


def preprocess_from_cfg(pre: dict[str, Any], image_size: int, *, source: str) -> EvalPreprocess:
    """Our evaluation transform for open_clip's `preprocess_cfg` (its size is the model's image size,
    as open_clip's create_model sets it)."""
    mode = pre.get("resize_mode", "shortest")
    if mode != "shortest":
        raise OpenClipError(
            f"{source}: preprocess_cfg.resize_mode={mode!r}: only 'shortest' (resize the "
            "shorter side, centre crop) is implemented here"
        )
    method = pre.get("interpolation", "bicubic")
    method = "bicubic" if method == "random" else method  # open_clip's eval transform does the same
    if method not in ("bicubic", "bilinear"):
        raise OpenClipError(f"{source}: preprocess_cfg.interpolation={method!r}: bicubic or bilinear only")
    return EvalPreprocess(image_size, image_size, method)


def image_stats_from_cfg(pre: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of open_clip's `preprocess_cfg` (its defaults: OpenAI's, CLIP's): the model's
    config.model.vision.image_mean / image_std, applied inside our model's jitted computation."""
    mean = tuple(float(x) for x in pre.get("mean", CLIP_MEAN))
    std = tuple(float(x) for x in pre.get("std", CLIP_STD))
    return mean, std


def read_config_file(path: str) -> dict[str, Any]:
    """An open_clip_config.json: {"model_cfg": ..., "preprocess_cfg": ...} (OpenClipError if not)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise OpenClipError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise OpenClipError(f"{path} has no model_cfg object (not an open_clip config)")
    return data


def packaged_model_names() -> list[str]:
    """The model configs the installed open_clip package ships (never importing it)."""
    return sorted(
        os.path.splitext(n)[0] for d in _config_dirs() for n in os.listdir(d) if n.endswith(".json")
    )


def _config_dirs() -> list[str]:
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return []
    dirs = list(spec.submodule_search_locations or []) if spec else []
    return [os.path.join(d, "model_configs") for d in dirs if os.path.isdir(os.path.join(d, "model_configs"))]


def packaged_model_cfg(name: str) -> dict[str, Any]:
    """open_clip's model config `name` (e.g. "RN50", "ViT-B-32") from its package's JSON files."""
    dirs = _config_dirs()
    if not dirs:
        raise OpenClipError(
            f"--model_name={name} reads open_clip's model configs from the open_clip package, "
            "which is not installed: `make setup` (requirements-nodeps.txt)"
        )
    for d in dirs:
        path = os.path.join(d, f"{name}.json")
        if os.path.basename(name) == name and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    names = packaged_model_names()
    close = [n for n in names if n.lower().startswith(name.lower()[:4])][:12]
    raise OpenClipError(
        f"--model_name={name!r} is not one of open_clip's model configs (e.g. {close or names[:12]})"
    )
