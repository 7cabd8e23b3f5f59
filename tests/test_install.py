"""`pip install .` gives a package that trains, loads and exports from any directory.

The package is built as a wheel from a copy of the sources and installed into
a temporary target (no download: the build backend is the venv's setuptools,
the dependencies are the venv's). Everything then runs in a directory outside
the repository, with only the installed package on the path: the console
scripts train and export, and `veclip_jax.load` reads our workdir and the
exported HF directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """A target directory holding the installed package and its console scripts."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "veclip_jax"), src / "veclip_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = glob.glob(str(tmp / "dist" / "veclip_jax-*.whl"))
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), wheel],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    return str(target)


def _run(target: str, cwd: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=target)  # the installed copy, not the repository
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_package_trains_loads_and_exports_from_another_directory(installed, demo_cache, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    workdir, exported = tmp_path / "run", tmp_path / "hf"
    scripts = os.path.join(installed, "bin")

    train = _run(installed, str(elsewhere), [
        os.path.join(scripts, "veclip-train"), f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
        f"--workdir={workdir}", f"--config.data.cache_dir={demo_cache}", "--config.total_steps=2",
        "--config.eval_every=0", "--config.checkpoint_every=0", "--config.optim.warmup_steps=0",
    ])  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    export = _run(installed, str(elsewhere), [
        os.path.join(scripts, "veclip-export"), f"--checkpoint={workdir}", f"--out={exported}",
    ])  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]

    check = f"""
import sys, numpy as np, veclip_jax
assert veclip_jax.__file__.startswith({installed!r}), veclip_jax.__file__
assert "configs" not in sys.modules
ours, hf = veclip_jax.load({str(workdir)!r}), veclip_jax.load({str(exported)!r})
image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
texts = ["a red circle.", "a blue square on a white background."]
pairs = [(ours.encode_image(image), hf.encode_image(image)), (ours.encode_text(texts), hf.encode_text(texts))]
for a, b in pairs:
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5, np.abs(a - b).max()
print("ok", ours.source)
"""
    loaded = _run(installed, str(elsewhere), [sys.executable, "-P", "-c", check])
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.startswith("ok " + str(workdir))
