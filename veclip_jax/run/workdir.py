"""The layout of a training workdir: the one place that names its files, and reads paths into it.

  WORKDIR/
    checkpoints/STEP/   Orbax checkpoints (written by veclip_jax/train/checkpoint.py, read by
                        veclip_jax/run/checkpoint.py)
    checkpoints-damaged/STEP-TIME/  checkpoints that failed to restore, set aside
    .lock               held by the running trainer (host, pid)
    config.json         the config the run last ran with
    spiece.model        the run's sentencepiece tokenizer (or tokenizer/, a HF tokenizer directory,
                        or bpe_simple_vocab_16e6.txt.gz, CLIP's BPE: data.tokenizer="clip_bpe")
    metrics.jsonl       training metrics, a line per logged step
    eval.jsonl          evaluations, a line per evaluated step
    tensorboard/        event files

A workdir is self-contained: export and `veclip_jax.load` need nothing else.
Every tool takes a run as a workdir, its checkpoints directory or one step's
directory: `run_path` is the one reading of such a path.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import stat
import time
from typing import Any

from veclip_jax.errors import ConfigError, UserError, WorkdirBusyError
from veclip_jax.fileio import as_path, atomic_write_bytes, is_local, normalize

CHECKPOINTS = "checkpoints"
DAMAGED_CHECKPOINTS = "checkpoints-damaged"  # damaged checkpoints, set aside (never deleted)
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "spiece.model"  # a sentencepiece model, copied into the workdir
TOKENIZER_DIR = "tokenizer"  # ... or a HF tokenizer directory
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # ... or CLIP's BPE vocabulary (veclip_jax/data/bpe.py)
TOKENIZER_NAMES = (TOKENIZER_FILE, TOKENIZER_DIR, CLIP_BPE_FILE)
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
STEP_PARAMS = "params"  # the item every checkpoint step holds (what marks a step's directory)


@dataclasses.dataclass(frozen=True)
class RunPath:
    """A path to a run, read (`run_path`): where its workdir, checkpoints and step are."""

    workdir: str | None  # the training workdir; None for a checkpoints directory outside the layout
    checkpoints: str  # the checkpoints directory (an Orbax CheckpointManager's)
    step: int | None  # named by the path or asked for; None: not chosen (the reader takes the newest)
    step_dir: str | None  # checkpoints/STEP when `step` is known


def run_path(path: str, step: int | None = None) -> RunPath:
    """Reads a workdir, its checkpoints directory or one step's directory (local or gs://).

    A workdir is a directory holding `checkpoints/`; a step's directory is a
    numbered one holding the `params` item; anything else is taken as a
    checkpoints directory, inside a workdir when it is named `checkpoints`.
    Raises FileNotFoundError when nothing is at `path`, ValueError when `path`
    is a step's directory and `step` names another. Whether a step exists and
    which is the newest is the checkpoint reader's to say (it lists them).
    """
    path = normalize(path)
    if not as_path(path).is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    base = os.path.basename(path)
    if (as_path(path) / CHECKPOINTS).is_dir():
        workdir, checkpoints = path, os.path.join(path, CHECKPOINTS)
    elif base.isdigit() and (as_path(path) / STEP_PARAMS).is_dir():
        if step is not None and step != int(base):
            raise ValueError(f"{path} is the checkpoint of step {base}, not {step}")
        checkpoints, step = os.path.dirname(path), int(base)
        workdir = os.path.dirname(checkpoints) if os.path.basename(checkpoints) == CHECKPOINTS else None
    else:
        checkpoints = path
        workdir = os.path.dirname(path) if base == CHECKPOINTS else None
    step_dir = None if step is None else os.path.join(checkpoints, str(step))
    return RunPath(workdir, checkpoints, step, step_dir)


def find_tokenizer(path: str) -> str:
    """The tokenizer a run kept in its workdir, found from a workdir, checkpoints or step directory.

    A directory outside the layout (a workdir before its first checkpoint) is searched itself.
    """
    run = run_path(path)
    where = run.workdir or run.checkpoints
    for name in TOKENIZER_NAMES:
        if (as_path(where) / name).exists():
            return os.path.join(where, name)
    raise FileNotFoundError(
        f"no tokenizer ({TOKENIZER_FILE}, {TOKENIZER_DIR}/ or {CLIP_BPE_FILE}) next to {path}: "
        "pass tokenizer=PATH"
    )


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The lines of a metrics or eval file (local or gs://)."""
    return [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]


def _tokenizer_files(path: str, is_dir: bool) -> dict[str, bytes]:
    """A tokenizer's files by name: the model file, or every file of a HF tokenizer directory but the
    weights that may sit beside it (what keep_tokenizer copies)."""
    root = as_path(path)
    if not is_dir:
        return {"": root.read_bytes()}
    # A HF tokenizer directory is flat (tokenizer.json, its config, vocabularies): its files, by name.
    files = [f for f in root.iterdir() if f.is_file() and not f.name.endswith(".safetensors")]
    return {f.name: f.read_bytes() for f in files}


def _same_tokenizer(kept: str, given: str, is_dir: bool) -> bool:
    """Whether the workdir's tokenizer and the config's hold the same files with the same bytes."""
    return _tokenizer_files(kept, is_dir) == _tokenizer_files(given, is_dir)


def _kept_name(workdir: str, tokenizer_path: str, is_dir: bool) -> str:
    """The workdir's name for this kind of tokenizer; refuses a workdir that keeps another kind."""
    name = CLIP_BPE_FILE if tokenizer_path.endswith(".txt.gz") else TOKENIZER_FILE
    name = TOKENIZER_DIR if is_dir else name
    for other in TOKENIZER_NAMES:
        if other != name and (as_path(workdir) / other).exists():
            raise ConfigError(
                f"config.data.tokenizer ({tokenizer_path}) differs from the tokenizer this workdir was "
                f"trained with ({os.path.join(workdir, other)}); use a new workdir, or the same tokenizer"
            )
    return name


def keep_tokenizer(workdir: str, tokenizer_path: str, *, writer: bool) -> str:
    """Keeps a copy of the run's tokenizer in the workdir (by the writing process); returns its path.

    A resumed run must use the tokenizer the workdir was trained with: a
    different sentencepiece model, a HF tokenizer directory whose files
    changed, or another kind of tokenizer, is refused (ConfigError naming the
    field). CLIP's BPE ("clip_bpe") is kept as its vocabulary file, so the
    workdir does not depend on the installed open_clip.
    """
    if tokenizer_path == "clip_bpe":  # the built-in name: its file (data.pipeline resolves it too)
        from veclip_jax.data import bpe

        tokenizer_path = bpe.resolve(tokenizer_path)
    if not is_local(workdir):
        return _keep_tokenizer_remote(workdir, tokenizer_path, writer=writer)
    os.makedirs(workdir, exist_ok=True)
    is_dir = os.path.isdir(tokenizer_path)
    kept = os.path.join(workdir, _kept_name(workdir, tokenizer_path, is_dir))
    if os.path.exists(kept):
        if not _same_tokenizer(kept, tokenizer_path, is_dir):
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


def _keep_tokenizer_remote(workdir: str, tokenizer_path: str, *, writer: bool) -> str:
    """keep_tokenizer for a gs:// workdir: the same checks, through epath (no rename: plain copies)."""
    source = as_path(tokenizer_path)
    is_dir = source.is_dir()
    kept = as_path(workdir) / _kept_name(workdir, tokenizer_path, is_dir)
    if kept.exists():
        if not _same_tokenizer(os.fspath(kept), tokenizer_path, is_dir):
            raise ConfigError(
                f"config.data.tokenizer ({tokenizer_path}) differs from the tokenizer this workdir was "
                f"trained with ({kept}); use a new workdir, or the same tokenizer"
            )
    elif writer:
        if is_dir:
            kept.mkdir(parents=True, exist_ok=True)
            for f in source.iterdir():
                if f.is_file() and not f.name.endswith(".safetensors"):
                    (kept / f.name).write_bytes(f.read_bytes())
        else:
            atomic_write_bytes(kept, source.read_bytes())
    return os.fspath(kept)


class WorkdirLock:
    """The workdir's exclusive lock, held by a running trainer (its writing process).

    `fcntl.flock` on WORKDIR/.lock: the kernel releases it when the holder
    exits or dies (even by kill -9), so a stale lock from a dead process is
    simply taken over. The file records who holds it, for the message a second
    trainer gets: WorkdirBusyError naming the host and pid (exit 2). A lock
    that is not a plain file of its own (a symlink, even dangling, a hard link,
    a FIFO) is refused before anything is written to it (UserError, exit 2).

    On a remote workdir (gs://) the lock is best-effort: an object store has
    neither flock nor create-if-absent through epath, and a preempted pod
    cannot remove its lock, so a lock object left there would block the
    resume. The holder is written to WORKDIR/.lock and a previous holder is
    only logged, never refused: one trainer per gs:// workdir is the user's
    to keep (`launch/tpu.py` runs one job per queued resource).
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None
        self._remote = not is_local(workdir)

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises WorkdirBusyError naming the live holder."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self._remote:
            lock = as_path(self.path)
            if lock.exists() and lock.read_text().strip():
                logging.getLogger(__name__).warning(
                    "%s: last held by %s (not checked on a remote workdir: best-effort lock)",
                    self.path, lock.read_text().strip())  # fmt: skip
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.write_text(json.dumps(info))
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(fd) as f:
                holder = f.read().strip() or "unknown"
            raise WorkdirBusyError(
                f"{os.path.dirname(self.path)} is in use by another trainer ({holder}): wait for it to "
                "finish, stop it, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def _open(self) -> int:
        """Opens (creating) the lock file, refusing anything but a plain file of its own.

        The lock is truncated and written, so whoever can write a shared run
        directory must not be able to point it elsewhere: O_NOFOLLOW refuses a
        symlink (a dangling one is not followed to create its target), and a
        FIFO, device, directory or hard link to another file is refused before
        a byte is written (O_NONBLOCK/O_NOCTTY: opening one has no side effect).
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

        def refuse(what: str) -> UserError:
            return UserError(f"{self.path} is not a plain lock file ({what}): remove it, or use another "
                             "--workdir; nothing was written to it")  # fmt: skip

        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise refuse("a symlink") from None
            if e.errno == errno.EISDIR:
                raise refuse("a directory") from None
            raise UserError(f"{self.path}: cannot open the workdir's lock ({e.strerror})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise refuse(what)
        return fd

    def release(self) -> None:
        if self._remote:
            as_path(self.path).write_text("")  # released: the next trainer sees no holder
            return
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
