"""Reading a run's checkpoints: their metadata and parameters, without the trainer.

What `veclip_jax.load`, export, standalone evaluation and `config.init_from`
read. A checkpoint is an Orbax step directory `WORKDIR/checkpoints/STEP/`
(the items are listed in veclip_jax/train/checkpoint.py, which writes them);
only the `params` and `meta` items are read here, never the optimizer state
or the data iterator. A path is a workdir, its checkpoints directory or one
step's directory (veclip_jax/run/workdir.py `run_path`); without a step the
newest complete checkpoint is read. A checkpoint that cannot be read raises
CheckpointError naming its directory and the other steps there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from veclip_jax.errors import CheckpointError
from veclip_jax.fileio import as_path
from veclip_jax.objectives import Objective, make_objective
from veclip_jax.objectives.model import abstract_model_state, abstract_params, build
from veclip_jax.run.workdir import STEP_PARAMS, RunPath, run_path

# The checkpoint item of a ResNet's BatchNorm running averages (train/checkpoint.py writes it).
MODEL_STATE_ITEM = "model_state"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON metadata item of a checkpoint (no arrays read)."""
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def _unreadable(root: str, step: int, e: BaseException, mngr: ocp.CheckpointManager) -> CheckpointError:
    others = sorted(s for s in mngr.all_steps() if s != step)
    hint = f"; other steps there: {others} (pass step=N)" if others else ""
    return CheckpointError(
        f"the checkpoint {os.path.join(root, str(step))} cannot be restored: "
        f"{type(e).__name__}: {_first_line(e)}{hint}"
    )


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    """A CheckpointManager that only reads, without Orbax's notes on what read-only implies.

    Orbax logs three absl warnings per read-only manager ("read_only=True, setting ...", "Given
    directory is read only"): every `veclip_jax.load` opened three. They say nothing the user can act
    on, so they are dropped while the manager is made; Orbax's other warnings are kept.
    """
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        return ocp.CheckpointManager(directory, options=options)
    finally:
        absl_log.setLevel(level)


def resolve_checkpoint(path: str, step: int | None = None) -> RunPath:
    """`run_path(path, step)` with its step chosen: the one the path or `step` names, else the newest.

    A step that is not a complete checkpoint there raises FileNotFoundError listing the steps.
    """
    run = run_path(path, step)
    if run.step_dir is not None and (as_path(run.step_dir) / STEP_PARAMS).is_dir():
        return run  # one step's directory, given or named
    mngr = _read_only_manager(run.checkpoints)
    try:
        steps = list(mngr.all_steps())
    finally:
        mngr.close()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint under {run.checkpoints}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(
            f"no checkpoint of step {step} under {run.checkpoints} (steps: {sorted(steps)})"
        )
    return dataclasses.replace(run, step=step, step_dir=os.path.join(run.checkpoints, str(step)))


def read_metadata(path: str, step: int | None = None) -> dict[str, Any]:
    """A checkpoint's JSON metadata (config, step; no arrays read), `path` as in `resolve_checkpoint`."""
    run = resolve_checkpoint(path, step)
    mngr = _read_only_manager(run.checkpoints)
    try:
        meta = _restore_meta(mngr, run.step)
    except Exception as e:
        raise _unreadable(run.checkpoints, run.step, e, mngr) from e
    finally:
        mngr.close()
    return dict(meta, checkpoint=run.step_dir, step=run.step)


def restore_params(
    path: str, abstract_params: Any | None = None, *, step: int | None = None, partial: bool = False
) -> tuple[Any, dict]:
    """(params, meta) of a checkpoint of ours (see `resolve_checkpoint` for `path`).

    `abstract_params` (ShapeDtypeStructs with shardings) says where to put the
    arrays and must match the checkpoint's shapes; None restores them with the
    shardings they were saved with (those devices must exist here). `partial`:
    read only the entries of `abstract_params` (e.g. the towers of a
    checkpoint trained with another objective's heads).
    """
    params, _, meta = restore_variables(path, abstract_params, step=step, partial=partial)
    return params, meta


def restore_variables(
    path: str,
    abstract_params: Any | None = None,
    abstract_model_state: Any | None = None,
    *,
    step: int | None = None,
    partial: bool = False,
) -> tuple[Any, dict, dict]:
    """(params, model state, meta): `restore_params`, and, when `abstract_model_state` is given
    (a ResNet's BatchNorm running averages), the checkpoint's model state item placed as it says."""
    run = resolve_checkpoint(path, step)
    mngr = _read_only_manager(run.checkpoints)
    try:
        if partial:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
            item = ocp.args.PyTreeRestore(abstract_params, restore_args=restore_args, partial_restore=True)
        else:
            item = ocp.args.StandardRestore(abstract_params)
        items = dict(params=item, meta=ocp.args.JsonRestore())
        if abstract_model_state:
            if not (as_path(run.step_dir) / MODEL_STATE_ITEM).is_dir():
                raise CheckpointError(
                    f"{run.step_dir} has no {MODEL_STATE_ITEM}/ (the BatchNorm running averages its "
                    "ResNet tower needs): it was not written by a ResNet run"
                )
            items[MODEL_STATE_ITEM] = ocp.args.StandardRestore(abstract_model_state)
        r = mngr.restore(run.step, args=ocp.args.Composite(**items))
    except CheckpointError:
        raise
    except Exception as e:
        raise _unreadable(run.checkpoints, run.step, e, mngr) from e
    finally:
        mngr.close()
    params = r["params"]
    if abstract_params is not None:  # Orbax gives plain containers: our structure back
        params = jax.tree.unflatten(jax.tree.structure(abstract_params), jax.tree.leaves(params))
    model_state = {}
    if abstract_model_state:
        leaves = jax.tree.leaves(r[MODEL_STATE_ITEM])
        model_state = jax.tree.unflatten(jax.tree.structure(abstract_model_state), leaves)
    return params, model_state, dict(r["meta"], checkpoint=run.step_dir, step=run.step)


@dataclasses.dataclass(frozen=True)
class TrainedParams:
    """A checkpoint's parameters with the model section they belong to."""

    model_config: ml_collections.ConfigDict
    params: Any  # on one device
    checkpoint: str  # the step directory read
    objective: Objective  # the run's, from its config.objective (its heads are in params["objective"])
    # The towers' other variable collections ({"batch_stats": ...} for a ResNet, {} for the ViT).
    model_state: dict = dataclasses.field(default_factory=dict)


def load_trained_params(path: str, step: int | None = None) -> TrainedParams:
    """The parameters of a checkpoint of ours on the first device, and its `config.model`.

    `path` as in `resolve_checkpoint`. What inference and export need; the
    optimizer state and data iterator are not read.
    """
    meta = read_metadata(path, step)
    model_cfg = ml_collections.ConfigDict(meta["config"]["model"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # The objective's own parameters (SigLIP's bias) are part of the saved tree: build them too.
    saved = meta["config"].get("objective")
    objective = make_objective(ml_collections.ConfigDict(saved) if saved else None)
    model = build(model_cfg, objective)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
    abstract = jax.tree.map(place, abstract_params(model))
    abstract_state = jax.tree.map(place, abstract_model_state(model))
    params, model_state, meta = restore_variables(path, abstract, abstract_state, step=meta["step"])
    return TrainedParams(model_cfg, params, meta["checkpoint"], objective, model_state)
