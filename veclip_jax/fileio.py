"""Small file helpers: atomic writes and JSON-safe values.

Every file the project writes that a reader may open while it is being
written (configs, stats, tokenizers, metrics rewrites) goes through
`atomic_write_*`: the bytes land in a temporary sibling, are flushed to disk
and renamed over the target, so a reader sees the old file or the new one,
never half of one, and a crash leaves the old file in place.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (temporary sibling, fsync, rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Writes `obj` as JSON (and a final newline) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")


def json_safe(x: Any) -> Any:
    """Tuples to lists, keys to str, numpy scalars to Python, non-finite floats to None, recursively.

    JSON has no NaN or infinity; a metric that is NaN is written as null.
    """
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:
        x = x.item()  # numpy / jax scalars
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
