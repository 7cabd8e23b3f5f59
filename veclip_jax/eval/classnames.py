"""Class names and prompt templates: the package's data files, a dataset's own, or a user's.

The files (veclip_jax/eval/data/, see SOURCES.md there) hold one entry a
line; a template marks the class name with `{}`. A spec is a name of a
packaged file (`imagenet1k`, `clip_80`), a path to such a file, or (for
templates) the strings themselves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources

CLIP_TEMPLATES = "clip_80"  # CLIP's 80 ImageNet templates: the default for any dataset without its own


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def packaged(kind: str) -> list[str]:
    """The names of the packaged files of `kind` ("classnames" or "templates")."""
    folder = resources.files("veclip_jax.eval").joinpath("data", kind)
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


def _load(kind: str, spec: str, root: str = "") -> list[str]:
    if spec in packaged(kind):
        text = resources.files("veclip_jax.eval").joinpath("data", kind, f"{spec}.txt").read_text("utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]
    path = os.path.join(root, os.path.expanduser(spec)) if root else os.path.expanduser(spec)
    if not os.path.isfile(path):
        known = ", ".join(packaged(kind))
        raise FileNotFoundError(f"{kind} {spec!r}: neither a packaged file ({known}) nor a file")
    return read_lines(path)


def load_classnames(spec: str, root: str = "") -> list[str]:
    """Class names, in label order, from a packaged name or a file (relative paths under `root`).

    A name may repeat (OpenAI's ImageNet names have two "crane"s: a bird and a machine).
    """
    return _load("classnames", spec, root)


def load_templates(spec: str | Sequence[str], root: str = "") -> list[str]:
    """Prompt templates from a packaged name, a file, or the templates themselves; each must hold `{}`."""
    templates = [spec] if isinstance(spec, str) and "{}" in spec else spec
    templates = _load("templates", templates, root) if isinstance(templates, str) else list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"templates {spec!r}: every template holds '{{}}' once (not: {bad[:3]})")
    return templates


def readable(label: str) -> str:
    """A machine label as words for a prompt: `golden_retriever` -> golden retriever, `/a/abbey` -> abbey."""
    parts = [p for p in label.split("/") if p]
    if len(parts) > 1 and len(parts[0]) == 1:  # SUN397's "/a/apartment_building/outdoor"
        parts = parts[1:]
    return " ".join(parts).replace("_", " ").strip()
