"""Small file helpers: atomic writes and JSON-safe values.

Every file the project writes that a reader may open while it is being
written (configs, stats, tokenizers, metrics rewrites) goes through
`atomic_write_*`: the bytes land in a temporary sibling, are flushed to disk
and renamed over the target, so a reader sees the old file or the new one,
never half of one, and a crash leaves the old file in place.

Paths may be local or remote (`gs://BUCKET/...`, a Cloud TPU pod's shared
workdir): `is_local` / `as_path` are the one path layer, etils.epath, the
library Orbax writes checkpoints through. An object store has no rename and
no append, but it writes an object whole or not at all when it is closed, so
a remote "atomic write" is a plain write, and `append_text` rewrites the
object (logs are small: a line per logged step).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

from etils import epath

from veclip_jax.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (temporary sibling, fsync, rename)."""
    path = os.fspath(path)
    if not is_local(path):
        as_path(path).write_bytes(data)  # an object appears whole when its upload completes
        return
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


def is_local(path: str | os.PathLike) -> bool:
    """False for a URL (gs://, s3://, ...): no flock, rename or append there; True for a local path."""
    return "://" not in os.fspath(path)


# The packages behind each remote protocol (fsspec's): not in requirements.txt, since only a run on
# Cloud Storage needs them (and gcsfs brings grpcio, google-auth, ...). Each resolves with our pins.
REMOTE_PACKAGES = {"gs": "gcsfs==2026.10.1"}


@functools.cache
def _check_remote_backend(protocol: str) -> None:
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        package = REMOTE_PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
        raise UserError(f"{protocol}:// paths need {package.split('==')[0]}, which is not installed: "
                        f"pip install '{package}'") from None  # fmt: skip


def as_path(path: str | os.PathLike) -> epath.Path:
    """The path as an etils.epath.Path, which reads and writes local and gs:// paths alike.

    A remote path whose filesystem package is missing is refused in one line (UserError) naming
    what to install, rather than failing at its first read or write.
    """
    if not is_local(path):
        _check_remote_backend(os.fspath(path).split("://", 1)[0])
    return epath.Path(path)


def normalize(path: str | os.PathLike) -> str:
    """A local path made absolute (~ expanded); a URL unchanged (abspath would mangle gs://)."""
    path = os.fspath(path)
    return os.path.abspath(os.path.expanduser(path)) if is_local(path) else path


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends `text` to a file: in place locally, by rewriting the object remotely (no append)."""
    if is_local(path):
        with open(path, "a") as f:
            f.write(text)
        return
    p = as_path(path)
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)


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
