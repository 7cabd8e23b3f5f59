"""open_clip's real model code as the reference of the parity tests, in a process of its own.

open_clip imports torchvision; the registry's torchvision 0.28.0 is a CUDA build whose import dies
beside the CPU torch 2.13.0 while registering fake kernels (`torchvision::nms does not exist`), and
which, once imported, breaks transformers' image-processor import. So: `make setup` installs it with
--no-deps into .venv/openclip/ (requirements-openclip.txt), never into the environment; this module,
run as a subprocess (`python tests/openclip_ref.py` or `run_reference(...)`), puts that folder on
sys.path and switches `torch.library.register_fake` off for the one import of torchvision, which open_clip's
model code and clip_benchmark's metrics never use (they use no torchvision operator). Every other
test process stays free of torchvision.

    available() -> str | None           why the reference cannot run here (None: it can)
    run_reference(code, **files) -> dict  `code` run with `open_clip` (and `torch`, `np`) imported,
                                          reading inputs from / writing outputs to npz files
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, ".venv", "openclip")


def import_open_clip() -> Any:
    """open_clip, with .venv/openclip's torchvision loaded without its fake-kernel registrations."""
    if TARGET not in sys.path:
        sys.path.insert(0, TARGET)
    import torch

    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda fn=None: fn)
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register_fake
    import open_clip

    return open_clip


def available() -> str | None:
    """None when open_clip's reference can run here; else the reason (tests skip locally, CI fails)."""
    if not os.path.isdir(os.path.join(TARGET, "torchvision")):
        return f"{TARGET} has no torchvision: run `make setup` (requirements-openclip.txt)"
    try:
        import importlib.util

        if importlib.util.find_spec("open_clip") is None or importlib.util.find_spec("torch") is None:
            return "open_clip or torch is not installed: run `make setup` (requirements-nodeps.txt)"
    except ImportError as e:
        return str(e)
    return None


def run_reference(code: str, timeout: float = 600, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Runs `code` in a fresh process with `open_clip`, `torch`, `np` and `inputs` (a dict of arrays)
    defined; the code fills the dict `outputs` with arrays, which come back."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(src, **inputs)
        prog = (
            f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "import numpy as np, torch\n"
            "from openclip_ref import import_open_clip\n"
            "open_clip = import_open_clip()\n"
            f"inputs = dict(np.load({src!r}))\n"
            "outputs = {}\n"
            f"{code}\n"
            f"np.savez({dst!r}, **{{k: np.asarray(v) for k, v in outputs.items()}})\n"
        )
        run = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout)
        if run.returncode:
            raise RuntimeError(f"open_clip reference failed:\n{run.stderr[-4000:]}")
        return dict(np.load(dst))


if __name__ == "__main__":
    oc = import_open_clip()
    print("open_clip", oc.__version__, "models:", len(oc.list_models()))
