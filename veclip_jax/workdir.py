"""The layout of a training workdir: the one place that names its files.

  WORKDIR/
    checkpoints/STEP/   Orbax checkpoints (veclip_jax/train/checkpoint.py)
    config.json         the config the run last ran with
    spiece.model        the run's sentencepiece tokenizer (or tokenizer/, a HF tokenizer directory)
    metrics.jsonl       training metrics, a line per logged step
    eval.jsonl          evaluations, a line per evaluated step
    tensorboard/        event files

A workdir is self-contained: export and `veclip_jax.load` need nothing else.
"""

from __future__ import annotations

import filecmp
import os
import shutil

from veclip_jax.config import ConfigError

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "spiece.model"  # a sentencepiece model, copied into the workdir
TOKENIZER_DIR = "tokenizer"  # ... or a HF tokenizer directory
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"


def find_tokenizer(checkpoint_dir: str) -> str:
    """The tokenizer a run kept in its workdir, found from a workdir, checkpoints or step directory."""
    d = os.path.abspath(checkpoint_dir)
    for _ in range(3):  # workdir, checkpoints/, checkpoints/STEP/: up to two levels above
        for name in (TOKENIZER_FILE, TOKENIZER_DIR):
            if os.path.exists(os.path.join(d, name)):
                return os.path.join(d, name)
        d = os.path.dirname(d)
    raise FileNotFoundError(
        f"no tokenizer ({TOKENIZER_FILE} or {TOKENIZER_DIR}/) next to {checkpoint_dir}: pass tokenizer=PATH"
    )


def keep_tokenizer(workdir: str, tokenizer_path: str, *, writer: bool) -> str:
    """Keeps a copy of the run's tokenizer in the workdir (by the writing process); returns its path.

    A resumed run must use the tokenizer the workdir was trained with: a
    different sentencepiece model is refused (ConfigError naming the field).
    """
    os.makedirs(workdir, exist_ok=True)
    is_dir = os.path.isdir(tokenizer_path)
    kept = os.path.join(workdir, TOKENIZER_DIR if is_dir else TOKENIZER_FILE)
    if os.path.exists(kept):
        if not is_dir and not filecmp.cmp(kept, tokenizer_path, shallow=False):
            raise ConfigError(
                f"config.data.tokenizer ({tokenizer_path}) differs from the tokenizer this workdir was "
                f"trained with ({kept}); use a new workdir, or the same tokenizer"
            )
    elif writer:
        tmp = f"{kept}.tmp{os.getpid()}"
        if is_dir:  # weights that sit beside a HF tokenizer are not the tokenizer's
            shutil.copytree(tokenizer_path, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
        else:
            shutil.copyfile(tokenizer_path, tmp)
        os.replace(tmp, kept)
    return kept
