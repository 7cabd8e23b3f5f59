"""veclip-jax: a JAX/Flax trainer for CLIP-style models (VeCLIP and the DeCLIP family).

`veclip_jax.load(path)` gives a model to embed images and texts with (veclip_jax/api.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from veclip_jax.api import LoadedCLIP


def load(path: str, **kwargs) -> LoadedCLIP:
    """A trained workdir / checkpoint, or a HuggingFace CLIP directory: see `veclip_jax.api.load`."""
    from veclip_jax.api import load as _load  # imports jax: not at package import

    return _load(path, **kwargs)
