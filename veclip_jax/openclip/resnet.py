"""Our ModifiedResNet's variables <-> open_clip's `visual.*` state dict of a ModifiedResNet.

Keys are open_clip's module tree without the "visual." prefix: conv1.weight, bn1.{weight, bias,
running_mean, running_var, num_batches_tracked}, layer2.0.downsample.0.weight (the conv),
layer2.0.downsample.1.* (its BN), layer2.3.conv3.weight, attnpool.positional_embedding,
attnpool.{q,k,v,c}_proj.{weight,bias}. Our blocks 1..n-1 of a stage are stacked on a leading axis
(`layerN/blocks`, models/resnet.py): index k is open_clip's block k + 1.

Layouts: conv kernels HWIO here, OIHW in torch; q/k/v kernels [C, heads, head_dim] and c_proj
[heads, head_dim, out] here, Linear weights [out, in] there. `num_batches_tracked` is written as an
int64 zero: torch reads it only when a BatchNorm's momentum is None, which open_clip never sets, and
our running averages use a fixed momentum too; it is ignored on the way in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from veclip_jax.errors import CheckpointError

Path = tuple[str, ...]

BLOCK_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
LEAF_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
TRACKED = "num_batches_tracked"


class StateDictError(CheckpointError):
    """An open_clip state dict that does not fit the model: a tensor missing, unexpected or mis-shaped."""


class _Layout:
    """How one (unstacked) leaf of ours becomes one torch tensor and back: a reshape/transpose pair."""

    def __init__(self, to_torch: Callable[[np.ndarray], np.ndarray], from_torch: Callable[..., np.ndarray]):
        self.to_torch, self.from_torch = to_torch, from_torch

    def torch_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.to_torch(np.broadcast_to(np.float32(0), shape)).shape


SAME = _Layout(lambda a: a, lambda t, shape: t)
CONV = _Layout(lambda a: a.transpose(3, 2, 0, 1), lambda t, shape: t.transpose(2, 3, 1, 0))
FLAT = _Layout(lambda a: a.reshape(-1), lambda t, shape: t.reshape(shape))


def _dense(n_in: int) -> _Layout:
    """A kernel with `n_in` leading input dims -> torch's [out, in] Linear weight."""

    def to_torch(a: np.ndarray) -> np.ndarray:
        return a.reshape(math.prod(a.shape[:n_in]), -1).T

    return _Layout(to_torch, lambda t, shape: t.T.reshape(shape))


def _torch_name(path: Path) -> tuple[str, _Layout]:
    """open_clip's key (block index "{}" still open for stacked blocks) and the layout of a leaf."""
    *mods, leaf = path
    if mods and mods[0] == "attnpool":
        if leaf == "positional_embedding":
            return "attnpool.positional_embedding", SAME
        proj = mods[1]
        if leaf == "bias":
            return f"attnpool.{proj}.bias", FLAT
        return f"attnpool.{proj}.weight", _dense(2 if proj == "c_proj" else 1)
    if mods[0].startswith("layer"):
        index = "0" if mods[1] == "block0" else "{}"
        mods = [mods[0], index, BLOCK_NAMES.get(mods[2], mods[2])]
    if leaf == "kernel":
        return ".".join([*mods, "weight"]), CONV
    return ".".join([*mods, LEAF_NAMES[leaf]]), SAME


def _entries(tree: Any) -> list[tuple[Path, str, _Layout, Any]]:
    """(our path, open_clip key pattern, layout, leaf) for every leaf of a params or stats tree."""
    flat = traverse_util.flatten_dict(nn.unbox(tree))
    return [(path, *_torch_name(path), leaf) for path, leaf in sorted(flat.items())]


def _stacked(path: Path) -> bool:
    return len(path) > 1 and path[1] == "blocks"


def resnet_to_openclip(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The ModifiedResNet's `params` and `batch_stats` (boxed or not) as open_clip's visual state dict."""
    out: dict[str, np.ndarray] = {}
    for tree in (params, batch_stats):
        for path, key, layout, leaf in _entries(tree):
            a = np.asarray(leaf, dtype=np.float32)
            if _stacked(path):
                for k in range(a.shape[0]):
                    out[key.format(k + 1)] = np.ascontiguousarray(layout.to_torch(a[k]))
            else:
                out[key] = np.ascontiguousarray(layout.to_torch(a))
    for key in [k for k in out if k.endswith(".running_var")]:
        out[key.removesuffix("running_var") + TRACKED] = np.zeros((), np.int64)
    return out


def resnet_from_openclip(
    state_dict: Mapping[str, Any], params_shapes: Any, stats_shapes: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, batch_stats) as nested dicts of float32 arrays shaped as `params_shapes` and
    `stats_shapes` (e.g. from jax.eval_shape of `init`; boxed or not), read from open_clip's visual
    state dict (keys without "visual."). Every tensor must be there with its shape and nothing else
    (num_batches_tracked aside): a StateDictError names the first that is not."""
    seen: set[str] = set()

    def read(key: str, layout: _Layout, shape: tuple[int, ...]) -> np.ndarray:
        if key not in state_dict:
            raise StateDictError(f"open_clip state dict: visual.{key} is missing (the model needs it)")
        t = np.asarray(state_dict[key])
        want = layout.torch_shape(shape)
        if t.shape != want:
            raise StateDictError(
                f"open_clip state dict: visual.{key} has shape {tuple(t.shape)}, the model needs {want}"
            )
        seen.add(key)
        return layout.from_torch(t.astype(np.float32), shape)

    trees = []
    for tree in (params_shapes, stats_shapes):
        flat = {}
        for path, key, layout, leaf in _entries(tree):
            shape = tuple(leaf.shape)
            if _stacked(path):
                flat[path] = np.stack([read(key.format(k + 1), layout, shape[1:]) for k in range(shape[0])])
            else:
                flat[path] = read(key, layout, shape)
        trees.append(traverse_util.unflatten_dict(flat))
    extra = sorted(k for k in state_dict if k not in seen and not k.endswith(TRACKED))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise StateDictError(f"open_clip state dict: visual.{extra[0]}{more} is not part of the model")
    return trees[0], trees[1]
