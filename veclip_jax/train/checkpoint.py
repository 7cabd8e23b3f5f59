"""Writing checkpoints with Orbax: parameters, optimizer state, the data iterator, metadata.

A checkpoint is one Orbax `CheckpointManager` step directory under
`WORKDIR/checkpoints/STEP/` holding four items:

  params  the model parameters (sharded arrays; restorable alone, e.g. for init_from or export)
  train   {"step", "opt_state", "nonfinite_steps"} and, when the objective has state (DeCLIP's
          text queue), "objective_state": the rest of the TrainState
  data    the grain iterator state, one file per process
  meta    JSON: the loop step, the non-finite streak, the run's config
  model_state  only for towers with one (a ResNet's BatchNorm running averages, {"batch_stats":
          ...}): beside params, restorable alone for evaluation, export and init_from

Saves are asynchronous (the arrays are copied to host memory, then written in
the background while training continues) and atomic: Orbax writes into
`STEP.orbax-checkpoint-tmp` and renames it when every item is complete, so a
save that fails or is interrupted never replaces the last good checkpoint;
the temporary directory is removed the next time the manager opens.

Faults: a background save that fails (a full disk) is reported at the next
step boundary (`check`), naming the directory and the free space, and the
run stops with the previous checkpoint intact. A damaged checkpoint (a file
truncated or deleted) is named, moved to `WORKDIR/checkpoints-damaged/`
(never deleted) and the run resumes from the newest intact one
(`restore_latest`); with none intact nothing is moved and the error names
every step and what is wrong with it.

This module is the trainer's: it saves and restores whole train states.
Reading a checkpoint's parameters and metadata without the trainer (load,
export, evaluation, `config.init_from`) is veclip_jax/run/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from veclip_jax.errors import CheckpointError, UserError
from veclip_jax.fileio import normalize
from veclip_jax.run.checkpoint import MODEL_STATE_ITEM, _first_line, _restore_meta
from veclip_jax.run.workdir import DAMAGED_CHECKPOINTS
from veclip_jax.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


def _train_item(state: TrainState) -> dict[str, Any]:
    """The "train" item: the TrainState but its parameters (objective state only when there is one,
    so checkpoints of stateless objectives keep their layout)."""
    train = {"step": state.step, "opt_state": state.opt_state, "nonfinite_steps": state.nonfinite_steps}
    if state.objective_state:
        train["objective_state"] = state.objective_state
    return train


def _ours(structure: Any, restored: Any) -> Any:
    """Orbax rebuilds containers as plain tuples/dicts: the restored leaves in `structure`'s tree."""
    return jax.tree.unflatten(jax.tree.structure(structure), jax.tree.leaves(restored))


class Checkpointer:
    """The run's CheckpointManager: save and restore whole train states with the data iterator."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = normalize(directory)  # a gs:// directory goes to Orbax (epath) as it is
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of an interrupted save
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step of the newest save started

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of every complete checkpoint, oldest first."""
        return sorted(self._mngr.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: TrainState, data_iter: Any, meta: dict[str, Any]) -> None:
        """Starts saving (returns once the arrays are copied off the devices); raises on failure."""
        train = _train_item(state)
        items = dict(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        if state.model_state:  # a ViT's checkpoints keep their four items
            items[MODEL_STATE_ITEM] = ocp.args.StandardSave(state.model_state)
        args = ocp.args.Composite(**items)
        with self._reporting_failures(step):
            self._mngr.save(step, args=args, force=True)
            self._pending = step

    def restore(
        self, step: int, abstract_state: TrainState, data_iter: Any
    ) -> tuple[TrainState, dict[str, Any]]:
        """The train state at `step`, placed as `abstract_state` says; moves `data_iter` to its position."""
        s = abstract_state
        abstract_train = _train_item(s)
        items = dict(
            params=ocp.args.StandardRestore(s.params),
            train=ocp.args.StandardRestore(abstract_train),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        )
        if s.model_state:
            items[MODEL_STATE_ITEM] = ocp.args.StandardRestore(s.model_state)
        r = self._mngr.restore(step, args=ocp.args.Composite(**items))
        params = _ours(s.params, r["params"])
        train = _ours(abstract_train, r["train"])
        state = TrainState(
            step=train["step"],
            params=params,
            opt_state=train["opt_state"],
            nonfinite_steps=train["nonfinite_steps"],
            objective_state=train.get("objective_state", {}),
            model_state=_ours(s.model_state, r[MODEL_STATE_ITEM]) if s.model_state else {},
        )
        return state, dict(r["meta"])

    def restore_latest(
        self,
        abstract_state: TrainState,
        data_iter: Any,
        check_meta: Callable[[dict[str, Any], int], None] = lambda meta, step: None,
    ) -> tuple[TrainState, dict[str, Any], int] | None:
        """(state, meta, step) of the newest checkpoint that restores, or None if there is none.

        `check_meta(meta, step)` runs first and may refuse the checkpoint (its
        errors propagate: a config mismatch is not damage). Newer checkpoints
        that fail to restore are set aside once an older one restores; if none
        restores, nothing is moved and CheckpointError names them all.
        """
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.metadata(step)
            except Exception as e:
                damaged.append((step, f"{type(e).__name__}: {_first_line(e)}"))
                continue
            check_meta(meta, step)
            try:
                state, meta = self.restore(step, abstract_state, data_iter)
            except UserError:
                raise  # a setting that does not match the checkpoint (e.g. the input's layout): not damage
            except Exception as e:
                damaged.append((step, f"{type(e).__name__}: {_first_line(e)}"))
                continue
            for bad, why in damaged:
                self._set_aside(bad, why)
            if damaged:
                self._mngr.reload()
            return state, meta, step
        if damaged:
            listing = "; ".join(f"step {s} ({self.step_dir(s)}): {why}" for s, why in damaged)
            raise CheckpointError(
                f"no checkpoint under {self.directory} restores: {listing}. Nothing was moved; repair or "
                "remove them (or start a new workdir)"
            )
        return None

    def _set_aside(self, step: int, why: str) -> None:
        """Moves a damaged step directory to WORKDIR/checkpoints-damaged/ (process 0), never deleting it."""
        target = os.path.join(
            os.path.dirname(self.directory), DAMAGED_CHECKPOINTS, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(self.step_dir(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        log.error("checkpoint of step %d is damaged (%s): moved to %s; resuming from an older one",
                  step, why, target)  # fmt: skip

    def metadata(self, step: int) -> dict[str, Any]:
        """The JSON metadata of a checkpoint (no arrays read)."""
        return _restore_meta(self._mngr, step)

    def check(self) -> None:
        """Raises CheckpointSaveError if a background save has failed (cheap: call at every step)."""
        with self._reporting_failures(self._pending):
            self._mngr.check_for_errors()

    def wait(self) -> None:
        """Blocks until background saves are written; raises CheckpointSaveError if one failed."""
        with self._reporting_failures(self._pending):
            self._mngr.wait_until_finished()

    @contextlib.contextmanager
    def _reporting_failures(self, step: int | None) -> Iterator[None]:
        """Turns a failed save into one CheckpointSaveError naming the directory and the free space."""
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as e:
            try:
                free = f"{shutil.disk_usage(self.directory).free / 2**30:.2f} GiB free"
            except OSError:
                free = "free space unknown"
            good = [s for s in self._mngr.all_steps() if step is None or s != step]
            last = f"step {max(good)} in {self.step_dir(max(good))}" if good else "none"
            raise CheckpointSaveError(
                f"saving the checkpoint of step {step} to {self.directory} failed ({free}): "
                f"{type(e).__name__}: {_first_line(e)}. The previous checkpoint is intact: {last}"
            ) from e

    def close(self) -> None:
        self._mngr.close()
