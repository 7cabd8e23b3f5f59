"""Export to a HuggingFace `transformers.CLIPModel` directory (the table: veclip_jax/hf/__init__.py).

Export writes what `CLIPModel.from_pretrained` and `AutoProcessor.from_pretrained`
load offline: config.json, model.safetensors, the tokenizer (our
sentencepiece model as a T5 tokenizer: same ids, `</s>` appended, padding 0)
and preprocessor_config.json (our evaluation preprocessing: shorter side to
the image size, bicubic, centre crop, CLIP mean/std).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from veclip_jax.data.image_ops import CLIP_MEAN, CLIP_STD
from veclip_jax.errors import UserError
from veclip_jax.hf import WEIGHTS
from veclip_jax.objectives import OBJECTIVE_PARAMS

log = logging.getLogger(__name__)

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


def objective_params(params: Any) -> dict[str, float]:
    """The training objective's own scalars (`objective/NAME`, e.g. SigLIP's bias), by name."""
    own = params.get(OBJECTIVE_PARAMS, {}) if isinstance(params, dict) else {}
    return {"/".join(path): float(x) for path, x in _flatten(own) if x.ndim == 0}


def objective_heads(params: Any) -> dict[str, list[int]]:
    """The training objective's own arrays that are not scalars (MLP heads, mappings): name -> shape."""
    own = params.get(OBJECTIVE_PARAMS, {}) if isinstance(params, dict) else {}
    return {"/".join(path): list(x.shape) for path, x in _flatten(own) if x.ndim}


# What an exported config.json says about objectives whose training the HF model cannot reproduce.
OBJECTIVE_NOTES = {
    "filip": (
        "Trained with FILIP's token-wise late-interaction loss (image patches x caption tokens). That "
        "similarity has no HF CLIPModel equivalent: this directory holds the towers, and CLIPModel "
        "scores their pooled embeddings, which FILIP trains only through objective.filip.clip_weight "
        "(0 in the toolkit's recipe). FILIP's token mappings and temperature are not exported."
    ),
}


def params_to_hf(params: Any, logit_scale_max: float = 100.0) -> dict[str, np.ndarray]:
    """Our parameter tree -> a `CLIPModel` state dict (numpy float32, HF layouts).

    The objective's own parameters (`objective/...`) have no place in CLIPModel:
    they are dropped, and the log says so. Any other unknown parameter is an error.
    """
    out: dict[str, np.ndarray] = {}
    dropped: dict[str, Any] = {**objective_params(params), **objective_heads(params)}
    if dropped:
        log.info("export: dropping the objective's own parameters (not in CLIPModel): %s", dropped)
    for path, x in _flatten(params):
        if path[0] == OBJECTIVE_PARAMS:
            continue
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


# --- configs, directories -----------------------------------------------------------------------------


def check_hf_expressible(model_cfg: Any) -> None:
    """Refuses a model HF `CLIPModel` cannot hold: a ResNet image tower (CLIPModel's is a ViT)."""
    if model_cfg.vision.get("type", "vit") != "vit":
        raise UserError(
            f"config.model.vision.type={model_cfg.vision.type!r}: HF CLIPModel has no ResNet image tower; "
            "export with --format=open_clip (open_clip's ModifiedResNet holds it)"
        )


def hf_config(model_cfg: Any) -> Any:
    """A `transformers.CLIPConfig` for our model section (sizes, activation, eps, token ids)."""
    import transformers

    check_hf_expressible(model_cfg)
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


def _host() -> str:
    """This host's name as it may appear in a file name (no separators)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _temp_prefix(out: str) -> str:
    """The temporary directory of an export to `out`: `.NAME.export-HOST-PID.` + mkdtemp's 8 characters."""
    return f".{os.path.basename(out)}.export-{_host()}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs here; True when unsure (a temporary is then kept, not removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's live process (EPERM), a pid out of range
        return True
    return True


def remove_stale_temporaries(out: str) -> list[str]:
    """Removes the temporaries of earlier exports to `out` that were killed; returns their paths.

    Only ours (named as `_temp_prefix` names them, a directory, owned by this
    user) and only when their writer is gone: written on this host by a
    process that no longer runs. A temporary of another host (a shared
    filesystem) or of a live export is left alone, as is one of an older
    version (no host and pid in its name: only logged).
    """
    parent, base = os.path.split(out)
    ours = re.compile(rf"\.{re.escape(base)}\.export-(.+)-([1-9][0-9]*)\.[a-z0-9_]{{8}}")
    older = re.compile(rf"\.{re.escape(base)}\.[a-z0-9_]{{8}}")
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        m = ours.fullmatch(name)
        if m and m.group(1) == _host() and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("export: removed %s, left by an export that was killed (pid %s)", path, m.group(2))
            removed.append(path)
        elif older.fullmatch(name):
            log.warning("export: %s may be left by a killed export of an earlier version: remove it if no "
                        "export to %s is running", path, out)  # fmt: skip
    return removed


def _publish_permissions(directory: str) -> None:
    """mkdtemp makes a private (0700) directory: give it and its files the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


@contextlib.contextmanager
def publishing(out: str) -> Iterator[str]:
    """A private temporary directory beside `out` to write an export into; on success it replaces
    `out` in one rename (a reader never sees half an export), on failure it is removed. Leftovers of
    an export killed mid-way are removed first (`remove_stale_temporaries`)."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(out), dir=parent)
    try:
        yield tmp
        _publish_permissions(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_tokenizer(tokenizer: Any, context_length: int) -> Any:
    """A transformers tokenizer that tokenises as ours: a HF tokenizer as it is, CLIP's BPE as
    transformers' CLIPTokenizer (veclip_jax.data.bpe.ClipBpeTokenizer.to_hf), or our sentencepiece
    model as a T5 tokenizer (same ids, `</s>` appended, padding 0)."""
    import transformers

    if hasattr(tokenizer, "hf"):  # veclip_jax.data.tokenizer.HFTokenizer
        return tokenizer.hf
    if hasattr(tokenizer, "to_hf"):  # veclip_jax.data.bpe.ClipBpeTokenizer
        return tokenizer.to_hf()
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
    objective: str = "clip",
) -> str:
    """Writes a transformers CLIP directory for our parameters and tokenizer; returns its path.

    `tokenizer` is the run's (veclip_jax.data.tokenizer: Tokenizer or HFTokenizer).
    `objective` (config.objective.name of the run) is recorded in config.json
    as `veclip_objective`, with `veclip_notes` where CLIPModel cannot do what
    the objective trained for (FILIP's token-wise similarity).
    Written into a temporary sibling and renamed into place, so `out` is never
    left half-written; the temporary names this host and process, so that a
    later export to `out` removes what a killed one left. Refuses an existing
    `out` unless `force`, and even then replaces only a directory that looks
    like an earlier export.
    """
    import safetensors.numpy
    import transformers

    out = os.path.abspath(os.path.expanduser(out))
    check_output(out, force=force)
    with publishing(out) as tmp:
        cfg = hf_config(model_cfg)
        if objective != "clip":
            cfg.veclip_objective = objective
        if objective_params(params):  # e.g. SigLIP's bias: kept in config.json for who needs the logits
            cfg.veclip_objective_params = objective_params(params)
        if objective_heads(params):  # training-only heads, not exported: their names and shapes
            cfg.veclip_dropped_heads = objective_heads(params)
        if objective in OBJECTIVE_NOTES:
            cfg.veclip_notes = OBJECTIVE_NOTES[objective]
            log.warning("export: %s", OBJECTIVE_NOTES[objective])
        cfg.save_pretrained(tmp)
        tensors = params_to_hf(params, model_cfg.logit_scale_max)
        safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        tokenizer = hf_tokenizer(tokenizer, model_cfg.text.context_length)
        size = model_cfg.vision.image_size
        image_processor = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            resample=3,  # PIL bicubic, as veclip_jax.data.image_ops.resize_center_crop
            # the model's own statistics (config.model.vision, applied in its jitted computation)
            image_mean=[float(x) for x in model_cfg.vision.get("image_mean", CLIP_MEAN)],
            image_std=[float(x) for x in model_cfg.vision.get("image_std", CLIP_STD)],
        )
        transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
        image_processor.save_pretrained(tmp)  # preprocessor_config.json, for CLIPImageProcessor alone
    return out


def _looks_like_export(path: str) -> bool:
    """An empty directory, or one holding a HF CLIP (or open_clip) config and weights and no training
    state of ours."""
    from veclip_jax.hf.from_hf import is_hf_clip_dir
    from veclip_jax.run.workdir import CHECKPOINTS

    if os.path.isdir(path) and not os.listdir(path):
        return True  # nothing to lose
    from veclip_jax.openclip.config import CONFIG_FILE
    from veclip_jax.openclip.config import WEIGHTS as OPEN_CLIP_WEIGHTS

    open_clip_export = all(os.path.isfile(os.path.join(path, f)) for f in (CONFIG_FILE, OPEN_CLIP_WEIGHTS))
    if open_clip_export and not os.path.exists(os.path.join(path, CHECKPOINTS)):
        return True  # an open_clip export (launch/export.py --format=open_clip)
    try:
        return (
            is_hf_clip_dir(path)
            and os.path.exists(os.path.join(path, WEIGHTS))
            and not os.path.exists(os.path.join(path, CHECKPOINTS))
        )
    except ValueError:  # a config.json that is not JSON: not ours to replace
        return False


def check_output(out: str, *, force: bool, source: str | None = None) -> None:
    """Refuses an export destination that would destroy something (before anything is loaded).

    `out` may not be, contain or lie inside `source` (the run exported from);
    an existing `out` needs `force`, and `force` replaces only an earlier export.
    Raises UserError naming the path.
    """
    out = os.path.realpath(os.path.expanduser(out))
    if source is not None:
        src = os.path.realpath(os.path.expanduser(source))
        if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
            raise UserError(f"--out={out} is, contains or lies inside the exported run {src}: choose "
                            "a directory outside it")  # fmt: skip
    if os.path.lexists(out):
        if not force:
            raise UserError(f"{out} exists: pass --force to replace an earlier export there")
        if not _looks_like_export(out):
            raise UserError(f"{out} is not an earlier export (nor empty): it lacks config.json + {WEIGHTS} "
                            "or holds checkpoints; refusing to replace it, even with --force")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """What an export reads of a run: its trained parameters (float32, on the host) and tokenizer."""

    trained: Any  # run.checkpoint.TrainedParams, arrays as numpy float32
    tokenizer: Any


def read_export_source(
    checkpoint: str, out: str, *, step: int | None, force: bool, check: Callable[[Any], None]
) -> ExportSource:
    """The checks every export makes, in order, then what it reads: `out` may not touch the run
    exported from (checked before anything is loaded); `check(model_cfg)` refuses a model the format
    cannot hold; then the parameters, the model state and the run's own tokenizer."""
    import jax

    from veclip_jax.data.tokenizer import load_tokenizer
    from veclip_jax.run.checkpoint import load_trained_params
    from veclip_jax.run.workdir import find_tokenizer, run_path

    run = run_path(os.path.realpath(os.path.expanduser(checkpoint)))
    check_output(out, force=force, source=run.workdir or run.checkpoints)
    trained = load_trained_params(checkpoint, step)
    check(trained.model_config)
    t = trained.model_config.text
    tokenizer = load_tokenizer(
        find_tokenizer(trained.checkpoint), t.context_length, pad_id=t.pad_id, eos_id=t.eos_id
    )
    host = lambda tree: jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)
    trained = dataclasses.replace(trained, params=host(trained.params), model_state=host(trained.model_state))
    return ExportSource(trained, tokenizer)


def export_checkpoint(checkpoint: str, out: str, *, step: int | None = None, force: bool = False) -> str:
    """A workdir / checkpoint of ours -> a transformers CLIP directory at `out` (see `save_hf_directory`)."""
    src = read_export_source(checkpoint, out, step=step, force=force, check=check_hf_expressible)
    trained, tokenizer = src.trained, src.tokenizer
    return save_hf_directory(
        out,
        trained.params,
        trained.model_config,
        tokenizer,
        force=force,
        objective=trained.objective.name,
    )
