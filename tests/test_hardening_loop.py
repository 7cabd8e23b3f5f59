"""The loop's hardening (issue 22): a failed evaluation loses nothing, SIGTERM during set-up is a stop.

- The step's checkpoint is saved before its evaluation, so an evaluation that
  fails (an undecodable image in an eval folder, a full disk while writing
  eval.jsonl) never costs the training since the last checkpoint; by default
  it is logged and counted (`eval_failures`) and training goes on; with
  `config.stop_on_eval_error` the run stops, its checkpoint committed.
- SIGTERM while the run sets up (restore, evaluator: minutes on a pod) is a
  request to stop, not a kill: train() returns at once, nothing trained, the
  process alive (exit 0 from the CLI), and the rerun starts normally.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import tiny_run_config
from veclip_jax.eval.evaluator import Evaluator
from veclip_jax.run.workdir import read_jsonl
from veclip_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 4, 2


def _config(demo_cache: str, **fields):
    fields = dict(total_steps=STEPS, checkpoint_every=EVERY, eval_every=EVERY, log_every=1) | fields
    return tiny_run_config(demo_cache, **fields)


@pytest.fixture
def eval_fails_at_the_first_evaluation(monkeypatch):
    calls = []
    run = Evaluator.__call__

    def failing(self, params, step=None, total=None):
        calls.append(step)
        if len(calls) == 1:
            raise OSError("image file is truncated (3 bytes not processed)")  # PIL's words
        return run(self, params, step, total)

    monkeypatch.setattr(Evaluator, "__call__", failing)
    return calls


def test_a_failed_evaluation_is_counted_and_training_goes_on_from_a_saved_step(
    demo_cache, tmp_path, eval_fails_at_the_first_evaluation, caplog
):
    with caplog.at_level(logging.ERROR, logger="veclip_jax.train.loop"):
        result = loop.train(_config(demo_cache), str(tmp_path))
    assert result.step == STEPS and eval_fails_at_the_first_evaluation == [EVERY, STEPS]
    assert os.path.isdir(tmp_path / "checkpoints" / str(EVERY))  # saved before the failed evaluation
    assert "evaluation at step 2 failed: OSError: image file is truncated" in caplog.text
    lines = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [m["eval_failures"] for m in lines] == [0, 0, 1, 1]  # counted from the line after step 2 evaluates
    assert [m["step"] for m in read_jsonl(str(tmp_path / "eval.jsonl"))] == [STEPS]  # the later one ran


def test_stop_on_eval_error_stops_with_the_steps_checkpoint_committed(
    demo_cache, tmp_path, eval_fails_at_the_first_evaluation
):
    with pytest.raises(loop.EvaluationError, match=r"step 2 failed.*last checkpoint: step 2"):
        loop.train(_config(demo_cache, stop_on_eval_error=True), str(tmp_path))
    resumed = loop.train(_config(demo_cache), str(tmp_path))  # the rerun goes on from the saved step
    assert resumed.start_step == EVERY and resumed.step == STEPS


_SIGTERM_IN_SET_UP = """
import os, signal, sys
from tests.helpers import tiny_run_config
from veclip_jax.train import loop

make = loop._make_evaluator

def preempted_while_setting_up(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # what a pod's scheduler sends while the run restores
    return make(*args, **kwargs)

loop._make_evaluator = preempted_while_setting_up
config = tiny_run_config(sys.argv[1], total_steps=4, checkpoint_every=2, eval_every=2)
result = loop.train(config, sys.argv[2])
print("RESULT", result.preempted, result.start_step, result.step, result.checkpoint)
"""


def test_sigterm_during_set_up_stops_before_the_first_step(demo_cache, tmp_path):
    # In a child process: without the fix SIGTERM kills it (rc -15) instead of failing an assertion here.
    cmd = [sys.executable, "-c", _SIGTERM_IN_SET_UP, demo_cache, str(tmp_path)]
    child = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "RESULT True 0 0 None" in child.stdout  # stopped at once: nothing trained, nothing saved
    assert "SIGTERM before the first step" in child.stderr
    again = loop.train(_config(demo_cache), str(tmp_path))  # the rerun starts normally
    assert again.start_step == 0 and again.step == STEPS


# --- resuming with another config (issue 22, #8 and #14) -------------------------------------------


@pytest.fixture(scope="module")
def two_steps(demo_cache, tmp_path_factory):
    """A workdir with a checkpoint at step 2 of 4."""
    workdir = str(tmp_path_factory.mktemp("two_steps"))
    result = loop.train(_config(demo_cache, eval_every=0), workdir, stop_after=EVERY)
    assert result.step == EVERY and result.checkpoint
    return workdir


def test_resuming_with_another_objective_names_the_field_not_damage(two_steps, demo_cache):
    config = _config(demo_cache, eval_every=0)
    config.objective.name = "siglip"
    with pytest.raises(loop.ConfigError, match=r"config.objective differs.*name 'clip' -> 'siglip'"):
        loop.train(config, two_steps)
    config = _config(demo_cache, eval_every=0)
    config.optim.grad_clip_norm = 0.0  # no clipping: another optimizer state layout
    with pytest.raises(loop.ConfigError, match=r"config.optim.grad_clip_norm differs"):
        loop.train(config, two_steps)
    assert os.listdir(os.path.join(two_steps, "checkpoints")) == [str(EVERY)]  # nothing set aside


def test_resuming_with_a_new_schedule_says_so_loudly(two_steps, demo_cache, tmp_path, caplog):
    workdir = str(tmp_path / "w")
    shutil.copytree(two_steps, workdir)
    config = _config(demo_cache, eval_every=0, total_steps=2 * STEPS)
    with caplog.at_level(logging.WARNING, logger="veclip_jax.train.loop"):
        result = loop.train(config, workdir, stop_after=1)
    assert result.start_step == EVERY
    assert f"NEW LEARNING-RATE SCHEDULE: config.total_steps {STEPS} -> {2 * STEPS} changed since step 2" in (
        caplog.text
    )


# --- a mesh that cannot shard the model (issue 22, #11) --------------------------------------------


@pytest.mark.parametrize(
    "mesh, devices, message",
    [
        (dict(data=1, fsdp=6, tensor=1), 6, r"config.mesh.fsdp=6 does not divide the parameter .*64-wide"),
        (dict(data=1, fsdp=1, tensor=3), 3, r"config.mesh.tensor=3 does not divide the parameter"),
    ],
)
def test_a_mesh_that_does_not_divide_the_model_is_refused_before_the_workdir(
    demo_cache, tmp_path, mesh, devices, message
):
    import jax

    config = _config(demo_cache, batch_size=12, eval_batch_size=12)
    config.mesh.update(mesh)
    workdir = tmp_path / "w"
    with pytest.raises(loop.ConfigError, match=message):
        loop.train(config, str(workdir), devices=jax.devices()[:devices])
    assert not workdir.exists()  # refused before the workdir (and its lock) was made


# --- the run's tokenizer (issue 22, #9 and #10) -----------------------------------------------------


def test_a_junk_tokenizer_is_refused_before_it_enters_the_workdir(demo_cache, tmp_path):
    from veclip_jax.data.demo import ensure_demo_data
    from veclip_jax.data.tokenizer import TokenizerError

    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    workdir = tmp_path / "w"
    config = _config(demo_cache, eval_every=0)
    config.data.tokenizer = str(junk)
    with pytest.raises(TokenizerError, match=f"not a sentencepiece model: {junk}"):
        loop.train(config, str(workdir))
    assert not (workdir / "spiece.model").exists()
    config.data.tokenizer = ensure_demo_data(demo_cache).tokenizer  # the right one is not refused
    assert loop.train(config, str(workdir), stop_after=1).step == 1


def test_an_edited_hf_tokenizer_directory_is_refused_on_resume(tmp_path):
    from veclip_jax.errors import ConfigError
    from veclip_jax.run.workdir import keep_tokenizer

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (tok / "model.safetensors").write_bytes(b"weights beside it are not the tokenizer's")
    workdir = str(tmp_path / "w")
    kept = keep_tokenizer(workdir, str(tok), writer=True)
    assert sorted(os.listdir(kept)) == ["tokenizer.json"]
    assert keep_tokenizer(workdir, str(tok), writer=True) == kept  # unchanged: accepted
    (tok / "model.safetensors").write_bytes(b"other weights")  # not part of the tokenizer
    keep_tokenizer(workdir, str(tok), writer=True)
    (tok / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')  # new ids
    with pytest.raises(ConfigError, match="differs from the tokenizer this workdir was trained with"):
        keep_tokenizer(workdir, str(tok), writer=True)
    (tok / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (tok / "added_tokens.json").write_text("{}")  # a file added
    with pytest.raises(ConfigError, match="differs"):
        keep_tokenizer(workdir, str(tok), writer=True)
