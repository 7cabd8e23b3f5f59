"""`run_path`, the one reading of "workdir / checkpoints dir / step dir" paths, and the tools that use it.

A run is given as its workdir, its checkpoints directory or one step's
directory (`veclip_jax.load`, export, evaluation, the tokenizer lookup): each
reads the path through `veclip_jax.run.workdir.run_path`, so they agree on
where the workdir, the checkpoints and the step are. The directories here are
bare layouts (no checkpoint content): reading a path needs none.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.test_remote_workdir import RUN, gcs  # noqa: F401  (gcs: the in-memory gs:// fixture)
from veclip_jax.errors import UserError
from veclip_jax.eval.run import _run_of, write_results
from veclip_jax.fileio import as_path
from veclip_jax.hf.to_hf import export_checkpoint
from veclip_jax.run.checkpoint import resolve_checkpoint
from veclip_jax.run.workdir import RunPath, find_tokenizer, read_jsonl, run_path


def _workdir(tmp_path, steps=(4, 8)) -> str:
    """WORKDIR/checkpoints/STEP/params for each step, the run's tokenizer and config."""
    w = tmp_path / "run"
    for s in steps:
        (w / "checkpoints" / str(s) / "params").mkdir(parents=True)
    (w / "spiece.model").write_bytes(b"sentencepiece")
    (w / "config.json").write_text("{}")
    return str(w)


@pytest.mark.parametrize("given", ["", "checkpoints", "checkpoints/", "checkpoints/8", "checkpoints/8/"])
def test_a_workdir_its_checkpoints_and_a_step_read_as_the_same_run(tmp_path, given):
    w = _workdir(tmp_path)
    run = run_path(os.path.join(w, given))
    step = 8 if "8" in given else None
    assert run == RunPath(
        workdir=w,
        checkpoints=os.path.join(w, "checkpoints"),
        step=step,
        step_dir=os.path.join(w, "checkpoints", "8") if step else None,
    )
    assert find_tokenizer(os.path.join(w, given)) == os.path.join(w, "spiece.model")


def test_a_step_asked_for_is_placed_in_the_checkpoints(tmp_path):
    w = _workdir(tmp_path)
    assert run_path(w, step=4).step_dir == os.path.join(w, "checkpoints", "4")
    assert run_path(os.path.join(w, "checkpoints", "8"), step=8).step == 8
    # A step directory needs no listing: the reader takes it as it is.
    assert resolve_checkpoint(os.path.join(w, "checkpoints", "4")) == run_path(w, step=4)


def test_a_step_directory_refuses_another_step(tmp_path):
    w = _workdir(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoints/8 is the checkpoint of step 8, not 4"):
        run_path(os.path.join(w, "checkpoints", "8"), step=4)


def test_nothing_there_is_named(tmp_path):
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint directory at {missing}"):
        run_path(missing)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        find_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        export_checkpoint(missing, str(tmp_path / "out"))


def test_checkpoints_outside_a_workdir_have_no_workdir(tmp_path):
    (tmp_path / "ckpt" / "3" / "params").mkdir(parents=True)
    run = run_path(str(tmp_path / "ckpt" / "3"))
    assert run == RunPath(None, str(tmp_path / "ckpt"), 3, str(tmp_path / "ckpt" / "3"))
    with pytest.raises(FileNotFoundError, match="pass tokenizer="):
        find_tokenizer(str(tmp_path / "ckpt" / "3"))  # no workdir, so no kept tokenizer


def test_evaluation_and_export_find_the_run_from_a_step(tmp_path):
    w = _workdir(tmp_path)
    step = os.path.join(w, "checkpoints", "8")
    assert _run_of(step) == run_path(step)  # results go to its workdir, under its step
    os.remove(os.path.join(w, "config.json"))
    assert _run_of(step) is None  # not one of our workdirs: results go elsewhere
    # An export never writes into the run it reads, whichever of its paths names it.
    with pytest.raises(UserError, match=f"lies inside the exported run {w}"):
        export_checkpoint(step, os.path.join(w, "exported"))


def test_a_gs_workdir_reads_alike(gcs):  # noqa: F811
    (as_path(RUN) / "checkpoints" / "8" / "params").mkdir(parents=True)
    (as_path(RUN) / "config.json").write_text("{}")
    (as_path(RUN) / "spiece.model").write_bytes(b"sentencepiece")
    step = f"{RUN}/checkpoints/8"
    assert run_path(step) == run_path(RUN, step=8) == RunPath(RUN, f"{RUN}/checkpoints", 8, step)
    assert _run_of(step) == run_path(step)
    assert find_tokenizer(step) == f"{RUN}/spiece.model"


def test_evaluation_writes_its_results_into_a_gs_workdir(gcs):  # noqa: F811
    (as_path(RUN) / "eval.jsonl").write_text('{"step": 4, "coco/acc1": 0.25}\n')
    out = f"{RUN}/eval_results/step_8"
    files = write_results(out, {"coco": {"metrics": {"acc1": 0.5}}}, RUN, {"step": 8, "coco/acc1": 0.5})
    assert files == [f"{out}/coco.json"]
    assert json.loads((as_path(out) / "coco.json").read_text()) == {"metrics": {"acc1": 0.5}}
    assert read_jsonl(f"{RUN}/eval.jsonl") == [{"step": 4, "coco/acc1": 0.25}, {"step": 8, "coco/acc1": 0.5}]
