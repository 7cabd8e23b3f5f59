"""Import from HuggingFace CLIP directories (the table: veclip_jax/hf/__init__.py).

`import_hf(dir)` gives our model config, parameters and tokenizer for a
`transformers.CLIPModel` directory: OpenAI's or ours exported (with their
tokenizers), or a released VeCLIP checkpoint (config and weights only, T5's
sentencepiece model given separately). `hf_preprocess(dir)` is its image
preprocessing (resize and crop: uint8 pixels); its preprocessor's image mean/std
go into the model config (`model.vision.image_mean` / `image_std`), which the
model applies inside its jitted computation (models/clip.py).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from veclip_jax import defaults
from veclip_jax.data.image_ops import CLIP_MEAN, CLIP_STD, EvalPreprocess
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer, is_hf_tokenizer_dir
from veclip_jax.errors import UserError
from veclip_jax.hf import WEIGHTS
from veclip_jax.objectives.model import abstract_params, build

log = logging.getLogger(__name__)


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


def params_from_hf(state_dict: dict[str, np.ndarray], shapes: Any) -> Any:
    """A `CLIPModel` state dict -> our parameter tree shaped like `shapes` (a tree of ShapeDtypeStructs)."""
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

    out = build(shapes, ())
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


def model_config_from_hf(hf_cfg: Any, *, eos_id: int, pad_id: int) -> ml_collections.ConfigDict:
    """Our `config.model` section for a `transformers.CLIPConfig` (see veclip_jax/defaults.py)."""

    v, t = hf_cfg.vision_config, hf_cfg.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported activations: vision {v.hidden_act!r}, text {t.hidden_act!r}")
    if v.layer_norm_eps != t.layer_norm_eps:
        raise ValueError(f"the towers' layer_norm_eps differ ({v.layer_norm_eps}, {t.layer_norm_eps})")
    m = defaults.model_config("tiny")
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


def is_hf_clip_dir(path: str) -> bool:
    """Whether `path` is a HuggingFace CLIP model directory (config.json of model_type "clip").

    A config.json that is not JSON raises UserError naming the file and the
    parse error (unless the directory is a workdir of ours, whose config.json
    is only informative): a damaged HF directory is not "no model here".
    """
    from veclip_jax.run.workdir import CHECKPOINTS

    path = os.path.expanduser(path)
    config = os.path.join(path, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except OSError:
        return False
    except ValueError as e:  # also UnicodeDecodeError
        if os.path.isdir(os.path.join(path, CHECKPOINTS)):
            return False
        raise UserError(f"{config} is not valid JSON ({e}): cannot tell what model {path} holds") from None
    return isinstance(data, dict) and data.get("model_type") == "clip"


class HFWeightsError(UserError, ValueError):
    """A HF directory's weights that cannot be read: the file or index entry named (exit 2).

    Also a ValueError, as the eval command line reports those in one line.
    """


def load_hf_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a HF model directory: model.safetensors, or the shards its index names.

    UserError (naming the file or the index entry) for an index that is not
    JSON with a weight_map, an entry that is not a safetensors file name in
    this directory, or a file safetensors cannot read.
    """
    path = os.path.expanduser(path)
    single = os.path.join(path, WEIGHTS)
    index = os.path.join(path, WEIGHTS + ".index.json")
    if os.path.exists(single):
        return _load_safetensors(single)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # also UnicodeDecodeError
            raise HFWeightsError(f"{index}: not a safetensors index (JSON with a weight_map; {e!r})") from e
        for name in files:
            _check_shard_name(index, name)
        out: dict[str, np.ndarray] = {}
        for name in files:
            out.update(_load_safetensors(os.path.join(path, name), index=index))
        return out
    raise FileNotFoundError(
        f"no {WEIGHTS} in {path} (PyTorch .bin checkpoints are not read: re-save it with "
        "CLIPModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))"
    )


def _check_shard_name(index: str, name: Any) -> None:
    """UserError unless an index entry is a bare `*.safetensors` file name (beside the index).

    What transformers writes (model-00001-of-00002.safetensors): a name with a
    directory part (`../`, an absolute path, `sub/`) could reach any file the
    user can read, so it is refused rather than resolved. The file itself may
    be a symlink (a HF hub cache's snapshot links every file to ../../blobs/).
    """
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise HFWeightsError(f"{index}: weight_map entry {name!r} is not a .safetensors file (only "
                             "safetensors shards are read: re-save with save_pretrained(dir, "
                             "safe_serialization=True))")  # fmt: skip
    if os.path.basename(name) != name:
        where = os.path.dirname(index)
        raise HFWeightsError(f"{index}: weight_map entry {name!r} is not a file name in {where} "
                             "(a shard outside the model directory is never read)")  # fmt: skip


def _load_safetensors(file: str, index: str | None = None) -> dict[str, np.ndarray]:
    """A safetensors file's tensors; UserError naming it when it is missing or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    named = f" (named by {index})" if index else ""
    try:
        return load_file(file)
    except OSError as e:  # missing, a directory, unreadable
        raise HFWeightsError(f"{file}{named}: {e.strerror or e}") from None
    except SafetensorError as e:
        raise HFWeightsError(f"{file}{named}: not a safetensors file ({e})") from None


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


def import_params(hf_dir: str, placement: Any) -> Any:
    """A HF CLIP directory's weights as our parameters, placed as `placement` (ShapeDtypeStructs
    with shardings) says; each device takes only its shards."""
    import jax

    host = params_from_hf(load_hf_state_dict(hf_dir), placement)
    return jax.tree.map(
        lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda idx: x[idx]), host, placement
    )


def _image_processor_config(hf_dir: str) -> tuple[dict[str, Any], str]:
    """(a HF CLIP directory's image processor settings ({} when it has none), the file they are in)."""
    path = os.path.join(hf_dir, "preprocessor_config.json")
    processor = os.path.join(hf_dir, "processor_config.json")  # transformers 5 may keep it here instead
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), path
    if os.path.exists(processor):
        with open(processor) as f:
            return json.load(f).get("image_processor", {}), processor
    return {}, path


def hf_image_stats(hf_dir: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(image_mean, image_std) of a HF CLIP directory's image processor; CLIP's when it has none (the
    released VeCLIP checkpoints: VeCLIP normalises with CLIP's). The model config carries them."""
    p, _ = _image_processor_config(hf_dir)
    mean = tuple(float(x) for x in p.get("image_mean", CLIP_MEAN))
    std = tuple(float(x) for x in p.get("image_std", CLIP_STD))
    return mean, std


def hf_preprocess(hf_dir: str, image_size: int) -> EvalPreprocess:
    """The resize and crop of a HF CLIP directory: its preprocessor_config.json, else VeCLIP's.
    Its mean/std are the model's (`hf_image_stats`, applied in the model)."""
    p, path = _image_processor_config(hf_dir)
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
    return EvalPreprocess(int(size), int(crop), method)


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
    model_cfg.vision.image_mean, model_cfg.vision.image_std = hf_image_stats(hf_dir)
    params = params_from_hf(load_hf_state_dict(hf_dir), abstract_params(build(model_cfg)))
    return model_cfg, params, tok
