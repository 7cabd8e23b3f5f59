"""To and from HuggingFace `transformers.CLIPModel`: a table of renames, reshapes and transposes.

Our parameter tree already uses HF's names (veclip_jax/models), so each entry
below only says how a tensor's layout differs:

  ours                                   HF                                     change
  */patch_embedding/kernel  [p,p,3,D]    *.patch_embedding.weight  [D,3,p,p]    transpose (3,2,0,1)
  */encoder/layers/X        [L, ...]     *.encoder.layers.{i}.X                 split the stacked axis
  */self_attn/{q,k,v}_proj/kernel [D,H,K] *.{q,k,v}_proj.weight [H*K, D]        flatten heads, transpose
  */self_attn/{q,k,v}_proj/bias   [H,K]   *.{q,k,v}_proj.bias   [H*K]           flatten heads
  */self_attn/out_proj/kernel [H,K,D]    *.out_proj.weight [D, H*K]             flatten heads, transpose
  */Dense kernel            [in, out]    *.weight [out, in]                     transpose
  */LayerNorm scale, bias                *.weight, *.bias                       rename
  logit_scale               ()           logit_scale ()                         clipped at ln(logit_scale_max)

Export writes what `CLIPModel.from_pretrained` and `AutoProcessor.from_pretrained`
load offline: config.json, model.safetensors, the tokenizer (our
sentencepiece model as a T5 tokenizer: same ids, `</s>` appended, padding 0)
and preprocessor_config.json (our evaluation preprocessing: shorter side to
the image size, bicubic, centre crop, CLIP mean/std).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from veclip_jax.data.image_ops import CLIP_MEAN, CLIP_STD

WEIGHTS = "model.safetensors"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


# --- parameters ---------------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _flatten(tree[k], (*prefix, str(k)))
    else:
        yield prefix, np.asarray(tree, np.float32)


def _to_hf_tensor(path: tuple[str, ...], x: np.ndarray) -> tuple[str, np.ndarray]:
    """One of our (per-layer) tensors -> (HF name suffix, HF array)."""
    *module, leaf = path
    name = ".".join(module)
    if leaf == "kernel":
        if module[-1] == "patch_embedding":
            return f"{name}.weight", x.transpose(3, 2, 0, 1)
        if module[-1] in ("q_proj", "k_proj", "v_proj"):
            return f"{name}.weight", x.reshape(x.shape[0], -1).T
        if module[-1] == "out_proj":
            return f"{name}.weight", x.reshape(-1, x.shape[-1]).T
        return f"{name}.weight", x.T
    if leaf == "bias":
        return f"{name}.bias", x.reshape(-1)
    if leaf == "scale":
        return f"{name}.weight", x
    if leaf in ("class_embedding",):
        return f"{name}.{leaf}", x
    if leaf in ("position_embedding", "token_embedding"):
        return f"{name}.{leaf}.weight", x
    raise ValueError(f"no HF name for parameter {'/'.join(path)}")


def params_to_hf(params: Any, logit_scale_max: float = 100.0) -> dict[str, np.ndarray]:
    """Our parameter tree -> a `CLIPModel` state dict (numpy float32, HF layouts)."""
    out: dict[str, np.ndarray] = {}
    for path, x in _flatten(params):
        if path == ("logit_scale",):
            out["logit_scale"] = np.asarray(min(float(x), math.log(logit_scale_max)), np.float32)
            continue
        if "layers" in path:  # the scanned stack: split the leading axis into HF's numbered layers
            i = path.index("layers")
            for layer in range(x.shape[0]):
                name, arr = _to_hf_tensor(path[i + 1 :], x[layer])
                out[".".join(path[:i]) + f".layers.{layer}.{name}"] = np.ascontiguousarray(arr)
        else:
            name, arr = _to_hf_tensor(path, x)
            out[name] = np.ascontiguousarray(arr)
    return out


def _from_hf_tensor(path: tuple[str, ...], shape: tuple[int, ...], hf: dict[str, np.ndarray], hf_prefix: str):
    """The inverse of _to_hf_tensor for one of our (per-layer) tensors of `shape`."""
    *module, leaf = path
    name = hf_prefix + ".".join(module)
    if leaf == "kernel":
        w = hf[f"{name}.weight"]
        if module[-1] == "patch_embedding":
            return w.transpose(2, 3, 1, 0)
        return w.T.reshape(shape)
    if leaf == "bias":
        return hf[f"{name}.bias"].reshape(shape)
    if leaf == "scale":
        return hf[f"{name}.weight"]
    if leaf == "class_embedding":
        return hf[f"{name}.{leaf}"]
    return hf[f"{name}.{leaf}.weight"]


def params_from_hf(state_dict: dict[str, np.ndarray], abstract_params: Any) -> Any:
    """A `CLIPModel` state dict -> our parameter tree shaped like `abstract_params` (shapes only)."""
    used: set[str] = set()
    tracked = _Tracked(state_dict, used)

    def build(tree: Any, prefix: tuple[str, ...]) -> Any:
        if isinstance(tree, dict):
            return {k: build(v, (*prefix, str(k))) for k, v in tree.items()}
        shape = tuple(tree.shape)
        if prefix == ("logit_scale",):
            arr = np.asarray(tracked["logit_scale"]).reshape(shape)
        elif "layers" in prefix:
            i = prefix.index("layers")
            base = ".".join(prefix[:i]) + ".layers."
            arr = np.stack(
                [
                    _from_hf_tensor(prefix[i + 1 :], shape[1:], tracked, f"{base}{layer}.")
                    for layer in range(shape[0])
                ]
            )
        else:
            arr = _from_hf_tensor(prefix, shape, tracked, "")
        arr = np.asarray(arr, np.float32)
        if arr.shape != shape:
            raise ValueError(
                f"{'/'.join(prefix)}: the HF weights give shape {arr.shape}, the model needs {shape}"
            )
        return arr

    out = build(abstract_params, ())
    unused = sorted(k for k in state_dict if k not in used and not k.endswith("position_ids"))
    if unused:
        raise ValueError(f"HF weights not used by the model (a different architecture?): {unused[:8]}")
    return out


class _Tracked(dict):
    """A dict view that records which keys were read, and names a missing one clearly."""

    def __init__(self, data: dict[str, np.ndarray], used: set[str]):
        super().__init__(data)
        self._used = used

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self:
            raise KeyError(f"the HF weights have no tensor {key!r}")
        self._used.add(key)
        return np.asarray(super().__getitem__(key), np.float32)


# --- configs --------------------------------------------------------------------------------------------


def hf_config(model_cfg: Any) -> Any:
    """A `transformers.CLIPConfig` for our model section (sizes, activation, eps, token ids)."""
    import transformers

    v, t = model_cfg.vision, model_cfg.text
    cfg = transformers.CLIPConfig(
        projection_dim=model_cfg.embed_dim,
        logit_scale_init_value=model_cfg.logit_scale_init,
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.mlp_dim,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.context_length,
            hidden_act=model_cfg.act,
            layer_norm_eps=model_cfg.layer_norm_eps,
            projection_dim=model_cfg.embed_dim,
            # HF pools the text at the first eos_token_id (unless it is 2: argmax of ids).
            eos_token_id=t.eos_id,
            pad_token_id=t.pad_id,
            bos_token_id=t.eos_id,  # T5 has no begin token; HF CLIP does not use it
        ),
        vision_config=dict(
            hidden_size=v.width,
            intermediate_size=v.mlp_dim,
            num_hidden_layers=v.layers,
            num_attention_heads=v.heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=model_cfg.act,
            layer_norm_eps=model_cfg.layer_norm_eps,
            projection_dim=model_cfg.embed_dim,
        ),
    )
    cfg.architectures = ["CLIPModel"]
    return cfg


def model_config_from_hf(hf_cfg: Any, *, eos_id: int, pad_id: int) -> ml_collections.ConfigDict:
    """Our `config.model` section for a `transformers.CLIPConfig` (see configs/base.py)."""
    from configs import base

    v, t = hf_cfg.vision_config, hf_cfg.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported activations: vision {v.hidden_act!r}, text {t.hidden_act!r}")
    if v.layer_norm_eps != t.layer_norm_eps:
        raise ValueError(f"the towers' layer_norm_eps differ ({v.layer_norm_eps}, {t.layer_norm_eps})")
    m = base.model_config("tiny")
    m.size = "hf"
    m.vision.update(
        image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size, layers=v.num_hidden_layers,
        heads=v.num_attention_heads, mlp_dim=v.intermediate_size,
    )  # fmt: skip
    m.text.update(
        vocab_size=t.vocab_size, context_length=t.max_position_embeddings, width=t.hidden_size,
        layers=t.num_hidden_layers, heads=t.num_attention_heads, mlp_dim=t.intermediate_size,
        eos_id=int(eos_id), pad_id=int(pad_id),
    )  # fmt: skip
    m.embed_dim = hf_cfg.projection_dim
    m.act = v.hidden_act
    m.layer_norm_eps = float(v.layer_norm_eps)
    m.logit_scale_init = float(hf_cfg.logit_scale_init_value)
    return m


# --- directories ------------------------------------------------------------------------------------------


def is_hf_clip_dir(path: str) -> bool:
    """Whether `path` is a HuggingFace CLIP model directory (config.json of model_type "clip")."""
    try:
        with open(os.path.join(os.path.expanduser(path), "config.json")) as f:
            return json.load(f).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


def load_hf_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a HF model directory: model.safetensors, or the shards its index names."""
    from safetensors.numpy import load_file

    path = os.path.expanduser(path)
    single = os.path.join(path, WEIGHTS)
    index = os.path.join(path, WEIGHTS + ".index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for name in files:
            out.update(load_file(os.path.join(path, name)))
        return out
    raise FileNotFoundError(
        f"no {WEIGHTS} in {path} (PyTorch .bin checkpoints are not read: re-save it with "
        "CLIPModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))"
    )


def _publish_permissions(directory: str) -> None:
    """mkdtemp makes a private (0700) directory: give it and its files the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def hf_tokenizer(tokenizer: Any, context_length: int) -> Any:
    """A transformers tokenizer that tokenises as ours: a HF tokenizer as it is, or our
    sentencepiece model as a T5 tokenizer (same ids, `</s>` appended, padding 0)."""
    import transformers

    if hasattr(tokenizer, "hf"):  # veclip_jax.data.tokenizer.HFTokenizer
        return tokenizer.hf
    with tempfile.TemporaryDirectory() as spm_dir:
        with open(os.path.join(spm_dir, "spiece.model"), "wb") as f:
            f.write(tokenizer.model_proto)
        # T5Tokenizer in transformers 5 converts the sentencepiece model only in from_pretrained.
        return transformers.T5Tokenizer.from_pretrained(spm_dir, extra_ids=0, model_max_length=context_length)


def save_hf_directory(
    out: str,
    params: Any,
    model_cfg: Any,
    tokenizer: Any,
    *,
    force: bool = False,
) -> str:
    """Writes a transformers CLIP directory for our parameters and tokenizer; returns its path.

    `tokenizer` is the run's (veclip_jax.data.tokenizer: Tokenizer or HFTokenizer).
    Written into a temporary sibling and renamed into place, so `out` is never
    left half-written. Refuses an existing `out` unless `force`.
    """
    import safetensors.numpy
    import transformers

    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        hf_config(model_cfg).save_pretrained(tmp)
        tensors = params_to_hf(params, model_cfg.logit_scale_max)
        safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        tokenizer = hf_tokenizer(tokenizer, model_cfg.text.context_length)
        size = model_cfg.vision.image_size
        image_processor = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            resample=3,  # PIL bicubic, as veclip_jax.data.image_ops.resize_center_crop
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
        transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
        image_processor.save_pretrained(tmp)  # preprocessor_config.json, for CLIPImageProcessor alone
        _publish_permissions(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_same_model(hf_dir: str, model_cfg: Any) -> None:
    """Raises ValueError naming the first `config.model` field that differs from a HF CLIP directory's."""
    import transformers

    hf_cfg = transformers.CLIPConfig.from_pretrained(os.path.expanduser(hf_dir))
    theirs = model_config_from_hf(hf_cfg, eos_id=model_cfg.text.eos_id, pad_id=model_cfg.text.pad_id)
    for section, fields in (
        ("vision", ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim")),
        ("text", ("vocab_size", "context_length", "width", "layers", "heads", "mlp_dim")),
    ):
        for f in fields:
            ours, hf = model_cfg[section][f], theirs[section][f]
            if ours != hf:
                raise ValueError(f"config.model.{section}.{f}={ours} but {hf_dir} has {hf}")
    for f in ("embed_dim", "act", "layer_norm_eps"):
        if model_cfg[f] != theirs[f]:
            raise ValueError(f"config.model.{f}={model_cfg[f]!r} but {hf_dir} has {theirs[f]!r}")


def import_params(hf_dir: str, abstract_params: Any) -> Any:
    """A HF CLIP directory's weights as our parameters, placed as `abstract_params` (with shardings) says."""
    import jax

    host = params_from_hf(load_hf_state_dict(hf_dir), abstract_params)
    return jax.tree.map(
        lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda idx: x[idx]),
        host,
        abstract_params,
    )


def export_checkpoint(checkpoint: str, out: str, *, step: int | None = None, force: bool = False) -> str:
    """A workdir / checkpoint of ours -> a transformers CLIP directory at `out` (see `save_hf_directory`)."""
    import jax

    from veclip_jax.api import load

    if os.path.exists(os.path.expanduser(out)) and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")  # before loading anything
    loaded = load(checkpoint, step=step)
    return save_hf_directory(
        out,
        jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), loaded.params),
        loaded.model_config,
        loaded.tokenizer,
        force=force,
    )
