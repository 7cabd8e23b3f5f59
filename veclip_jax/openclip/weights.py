"""Our parameters <-> an open_clip `CLIP` state dict; reading state-dict files safely.

The ViT and the text tower go through the HF export's table (veclip_jax/hf: our layout is HF
CLIPModel's), then a renaming to open_clip's (OpenAI's) names:
  HF                                        open_clip
  vision_model.embeddings.patch_embedding   visual.conv1
  vision_model.embeddings.class_embedding   visual.class_embedding
  vision_model.embeddings.position_embedding visual.positional_embedding
  vision_model.{pre_layrnorm,post_layernorm} visual.{ln_pre,ln_post}
  *.encoder.layers.N.                       {visual.,}transformer.resblocks.N.
    self_attn.{q,k,v}_proj                    attn.in_proj_{weight,bias} (q, k, v stacked in that order)
    self_attn.out_proj, layer_norm1/2         attn.out_proj, ln_1/2
    mlp.fc1, mlp.fc2                          mlp.c_fc, mlp.c_proj
  text_model.embeddings.{token,position}_embedding  token_embedding.weight, positional_embedding
  text_model.final_layer_norm               ln_final
  {visual,text}_projection.weight [out, in] visual.proj, text_projection [in, out] (transposed)
  logit_scale                               logit_scale
A ResNet image tower is veclip_jax/openclip/resnet.py's (`visual.*`, BatchNorm running averages
included). A `.bin`/`.pt`/`.pth` is a pickle: read only with torch's weights_only loader (tensors and
plain containers, never objects).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np

from veclip_jax.hf.from_hf import params_from_hf
from veclip_jax.hf.to_hf import params_to_hf
from veclip_jax.objectives import OBJECTIVE_PARAMS
from veclip_jax.openclip.config import OpenClipError

log = logging.getLogger(__name__)

_NAMES = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_TOWERS = {"vision_model": "visual.transformer.resblocks", "text_model": "transformer.resblocks"}
_HF_LAYER = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OC_LAYER = re.compile(r"(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)")
# OpenAI's TorchScript checkpoints carry these ints beside the weights (open_clip drops them too).
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def hf_to_open_clip(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A HF CLIPModel state dict (ViT and text tower) -> open_clip's names and layouts."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, x in hf.items():
        if name in _NAMES:
            out[_NAMES[name]] = x
        elif name in _TRANSPOSED:
            out[_TRANSPOSED[name]] = np.ascontiguousarray(x.T)
        elif m := _HF_LAYER.fullmatch(name):
            tower, layer, module, leaf = m.groups()
            prefix = f"{_TOWERS[tower]}.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, leaf), {})[module[-6]] = x
            else:
                out[f"{prefix}{_BLOCK[module]}.{leaf}"] = x
        else:
            raise ValueError(f"no open_clip name for the HF tensor {name}")
    for (prefix, leaf), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{leaf}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def open_clip_to_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_open_clip` (the `visual.*` keys of a ResNet are left out: resnet.py's)."""
    names = {v: k for k, v in _NAMES.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    towers = {v.removesuffix(".resblocks"): k for k, v in _TOWERS.items()}
    out: dict[str, np.ndarray] = {}
    for name, x in sd.items():
        if name in names:
            out[names[name]] = x
        elif name in transposed:
            out[transposed[name]] = np.ascontiguousarray(np.asarray(x).T)
        elif m := _OC_LAYER.fullmatch(name):
            tower, layer, rest = m.groups()
            prefix = f"{towers[tower]}.encoder.layers.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = rest.rsplit("_", 1)[1]
                for part, chunk in zip("qkv", np.split(np.asarray(x), 3, axis=0), strict=True):
                    out[f"{prefix}self_attn.{part}_proj.{leaf}"] = chunk
            else:
                module, _, leaf = rest.rpartition(".")
                if module not in block:
                    raise OpenClipError(f"open_clip state dict: {name} is not part of our towers")
                out[f"{prefix}{block[module]}.{leaf}"] = x
        else:
            raise OpenClipError(f"open_clip state dict: {name} is not part of our towers")
    return out


def _is_resnet(model_cfg: Any) -> bool:
    return model_cfg.vision.get("type", "vit") == "resnet"


def params_to_open_clip(
    params: Any, model_state: dict[str, Any] | None, model_cfg: Any
) -> dict[str, np.ndarray]:
    """Our parameters (and a ResNet's BatchNorm running averages) -> open_clip's CLIP state dict
    (float32 numpy). The objective's own parameters are left out; the temperature is clipped at
    `logit_scale_max` as training clips it."""
    towers = {k: v for k, v in params.items() if k != OBJECTIVE_PARAMS}
    if not _is_resnet(model_cfg):
        return hf_to_open_clip(params_to_hf(towers, model_cfg.logit_scale_max))
    from veclip_jax.openclip.resnet import resnet_to_openclip

    rest = {k: v for k, v in towers.items() if k != "vision_model"}
    out = hf_to_open_clip(params_to_hf(rest, model_cfg.logit_scale_max))
    stats = (model_state or {}).get("batch_stats", {}).get("vision_model")
    if stats is None:
        raise OpenClipError("a ResNet image tower needs its BatchNorm running averages (model_state)")
    visual = resnet_to_openclip(towers["vision_model"], stats)
    out.update({f"visual.{k}": v for k, v in visual.items()})
    return out


def params_from_open_clip(
    state_dict: dict[str, np.ndarray], params_shapes: Any, state_shapes: Any, model_cfg: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """open_clip's CLIP state dict -> (our tower parameters, model state) shaped as the given trees
    (ShapeDtypeStructs; the objective's own parameters, if any, are not read). Every tensor must be
    used: an unknown or missing name, or a wrong shape, is an error naming it."""
    sd = {k: v for k, v in state_dict.items() if k not in _OPENAI_EXTRAS}
    if "logit_bias" in sd:
        log.warning(
            "open_clip checkpoint: its logit_bias (%s) is not part of our towers: dropped",
            float(np.asarray(sd.pop("logit_bias")).reshape(-1)[0]),
        )
    if "logit_scale" in sd:  # open_clip's nonscalar_logit_scale keeps it as [1]
        sd["logit_scale"] = np.asarray(sd["logit_scale"], np.float32).reshape(())
    towers = {k: v for k, v in params_shapes.items() if k != OBJECTIVE_PARAMS}
    model_state: dict[str, Any] = {}
    if _is_resnet(model_cfg):
        from veclip_jax.openclip.resnet import resnet_from_openclip

        visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
        sd = {k: v for k, v in sd.items() if not k.startswith("visual.")}
        vision, stats = resnet_from_openclip(
            visual, towers["vision_model"], state_shapes["batch_stats"]["vision_model"]
        )
        model_state = {"batch_stats": {"vision_model": stats}}
        towers = {k: v for k, v in towers.items() if k != "vision_model"}
    try:
        params = params_from_hf(open_clip_to_hf(sd), towers)
    except (KeyError, ValueError) as e:
        if isinstance(e, OpenClipError):
            raise
        msg = str(e).strip("'\"").replace("the HF weights", "the open_clip checkpoint")
        raise OpenClipError(f"open_clip state dict does not fit the model: {msg}") from None
    if _is_resnet(model_cfg):
        params["vision_model"] = vision
    return params, model_state


# --- files -----------------------------------------------------------------------------------------


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A state dict file's tensors as float32 numpy: safetensors, or a torch pickle (`.bin`, `.pt`,
    `.pth`) read with `weights_only=True` (anything but tensors and plain containers is refused).
    A {"state_dict": ...} wrapper and DDP's "module." prefix are removed, as open_clip does."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise OpenClipError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            sd: Any = load_file(path)
        except SafetensorError as e:
            raise OpenClipError(f"{path}: not a safetensors file ({e})") from None
    else:
        import pickle

        import torch  # only here: reading a pickle needs torch's restricted unpickler

        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            why = (str(e).strip().splitlines() or [""])[0]
            raise OpenClipError(
                f"{path}: refused: the pickle holds more than tensors (torch.load weights_only=True: {why}). "
                "Only plain state dicts are read; re-save it as safetensors "
                "(safetensors.torch.save_file(model.state_dict(), 'open_clip_model.safetensors'))"
            ) from None
        except (RuntimeError, EOFError, OSError) as e:
            raise OpenClipError(f"{path}: not a torch checkpoint ({e})") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise OpenClipError(f"{path}: holds a {type(sd).__name__}, not a state dict")
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor) and k not in _OPENAI_EXTRAS]
        if bad:
            raise OpenClipError(f"{path}: {bad[0]!r} is not a tensor: not a plain state dict")
        sd = {
            k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in sd.items()
            if isinstance(v, torch.Tensor)
        }
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {k: np.asarray(v) for k, v in sd.items()}
