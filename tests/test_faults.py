"""Faults a production run meets: each survived or refused clearly, with nothing lost.

Issue #10's cases on the trainer, checkpoints, export, `veclip_jax.load` and the
command line (the input-side cases are in tests/test_data_*.py). Every fault
is injected by the test: damaged files, signals, a second trainer, a full
filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import tiny_run_config
from veclip_jax.errors import CheckpointError, UserError, WorkdirBusyError
from veclip_jax.run.checkpoint import restore_params
from veclip_jax.run.workdir import CHECKPOINTS, DAMAGED_CHECKPOINTS, METRICS_FILE, WorkdirLock, read_jsonl
from veclip_jax.train import loop
from veclip_jax.train.checkpoint import CheckpointSaveError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
EXPORT = os.path.join(ROOT, "launch", "export.py")


def _config(demo_cache, **fields):
    return tiny_run_config(demo_cache, **({"eval_every": 0, "keep_checkpoints": 3} | fields))


def _losses(workdir) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in read_jsonl(os.path.join(workdir, METRICS_FILE))}


def _damage(step_dir: str, how: str) -> None:
    """Truncates every data file of the parameters, or deletes the train item's metadata."""
    if how == "truncate":
        for root, _, files in os.walk(os.path.join(step_dir, "params")):
            for name in files:
                if os.path.basename(root) == "d":
                    with open(os.path.join(root, name), "r+b") as f:
                        f.truncate(max(os.path.getsize(f.name) // 3, 1))
    else:
        os.remove(os.path.join(step_dir, "train", "_METADATA"))


@pytest.fixture(scope="module")
def two_checkpoints(demo_cache, tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8, and its per-step losses."""
    workdir = str(tmp_path_factory.mktemp("two_checkpoints"))
    loop.train(_config(demo_cache), workdir)
    return workdir, _losses(workdir)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    two_checkpoints, demo_cache, tmp_path, how
):
    source, losses = two_checkpoints
    workdir = str(tmp_path / "run")
    subprocess.run(["cp", "-r", source, workdir], check=True)
    _damage(os.path.join(workdir, CHECKPOINTS, "8"), how)

    result = loop.train(_config(demo_cache), workdir)

    assert result.start_step == 4 and result.step == 8
    (aside,) = os.listdir(os.path.join(workdir, DAMAGED_CHECKPOINTS))
    assert aside.startswith("8-")  # kept, not deleted
    assert _losses(workdir) == losses  # steps 5..8 again, exactly as the first time


def test_with_no_intact_checkpoint_the_run_stops_naming_each_and_moves_nothing(
    two_checkpoints, demo_cache, tmp_path
):
    source, _ = two_checkpoints
    workdir = str(tmp_path / "run")
    subprocess.run(["cp", "-r", source, workdir], check=True)
    for step in (4, 8):
        _damage(os.path.join(workdir, CHECKPOINTS, str(step)), "truncate")
    with pytest.raises(CheckpointError, match=r"step 8 \(.*checkpoints/8\).*step 4 \(.*checkpoints/4\)"):
        loop.train(_config(demo_cache), workdir)
    assert sorted(os.listdir(os.path.join(workdir, CHECKPOINTS))) == ["4", "8"]
    assert not os.path.exists(os.path.join(workdir, DAMAGED_CHECKPOINTS))


def test_load_names_a_damaged_checkpoint(two_checkpoints, tmp_path):
    import veclip_jax

    workdir = str(tmp_path / "run")
    subprocess.run(["cp", "-r", two_checkpoints[0], workdir], check=True)
    _damage(os.path.join(workdir, CHECKPOINTS, "8"), "truncate")
    with pytest.raises(CheckpointError, match=r"checkpoints/8 cannot be restored.*other steps there: \[4\]"):
        veclip_jax.load(workdir)
    assert veclip_jax.load(workdir, step=4).source.endswith(os.path.join(CHECKPOINTS, "4"))


def _start_trainer(workdir, demo_cache, *extra) -> subprocess.Popen:
    cmd = [sys.executable, TRAIN, "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.data.cache_dir={demo_cache}", "--config.total_steps=100000", "--config.eval_every=0",
           "--config.checkpoint_every=0", *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 240) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"{text!r} never appeared:\n" + "".join(lines[-40:]))


def test_a_second_sigterm_while_saving_is_absorbed_and_the_save_commits(demo_cache, tmp_path):
    workdir = tmp_path / "run"
    proc = _start_trainer(workdir, demo_cache)
    _wait_for(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    steps = os.listdir(workdir / CHECKPOINTS)
    assert len(steps) == 1 and steps[0].isdigit(), steps  # committed, no *-tmp left
    assert "SIGTERM again" in out


def test_a_second_trainer_on_the_same_workdir_is_refused_naming_the_holder(demo_cache, tmp_path):
    workdir = str(tmp_path / "run")
    with WorkdirLock(workdir):
        with pytest.raises(WorkdirBusyError, match=rf"in use by another trainer \(.*\"pid\": {os.getpid()}"):
            loop.train(_config(demo_cache), workdir)
    assert not os.path.exists(os.path.join(workdir, CHECKPOINTS))  # nothing touched


def test_the_lock_of_a_killed_trainer_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from veclip_jax.run.workdir import WorkdirLock; "
        f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)"
    )], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusyError, match=f'"pid": {holder.pid}'):
        WorkdirLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    WorkdirLock(str(tmp_path)).acquire().release()  # the dead holder's lock is free


def test_the_cli_exits_2_naming_a_busy_workdir(demo_cache, tmp_path):
    workdir = str(tmp_path / "run")
    with WorkdirLock(workdir):
        out = subprocess.run([sys.executable, TRAIN, "--config=configs/tiny.py", f"--workdir={workdir}",
                              f"--config.data.cache_dir={demo_cache}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "in use by another trainer" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("where", ["workdir", "checkpoints", "inside", "parent"])
def test_export_refuses_an_output_that_is_contains_or_lies_inside_the_run(tiny_run, where):
    from veclip_jax.hf.to_hf import export_checkpoint

    workdir = tiny_run[0]
    out = {"workdir": workdir, "checkpoints": os.path.join(workdir, CHECKPOINTS),
           "inside": os.path.join(workdir, "hf"), "parent": os.path.dirname(workdir)}[where]  # fmt: skip
    with pytest.raises(UserError, match="is, contains or lies inside the exported run"):
        export_checkpoint(workdir, out, force=True)
    assert os.path.isdir(os.path.join(workdir, CHECKPOINTS))


def test_export_force_replaces_only_an_earlier_export(tiny_run, tmp_path):
    from veclip_jax.hf.to_hf import export_checkpoint

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not an earlier export"):
        export_checkpoint(tiny_run[0], str(other), force=True)
    assert (other / "keep.txt").read_text() == "mine"
    out = str(tmp_path / "hf")
    export_checkpoint(tiny_run[0], out)
    with pytest.raises(UserError, match="pass --force"):
        export_checkpoint(tiny_run[0], out)
    export_checkpoint(tiny_run[0], out, force=True)  # an earlier export: replaced
    cli = subprocess.run([sys.executable, EXPORT, f"--checkpoint={tiny_run[0]}", f"--out={tiny_run[0]}",
                          "--force"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cli.returncode == 2 and "lies inside the exported run" in cli.stderr, cli.stderr[-2000:]


def test_load_names_a_config_json_that_is_not_json(tmp_path):
    import veclip_jax

    (tmp_path / "config.json").write_text('{"model_type": "clip", ')
    with pytest.raises(UserError, match=r"config\.json is not valid JSON"):
        veclip_jax.load(str(tmp_path))


@pytest.fixture(scope="module")
def loaded(tiny_run):
    import veclip_jax

    return veclip_jax.load(tiny_run[0])


def test_encode_image_takes_grayscale_as_one_image(loaded):
    gray = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)
    out = loaded.encode_image(gray)
    assert out.shape == (1, loaded.model.towers.embed_dim)
    np.testing.assert_allclose(out, loaded.encode_image(np.repeat(gray[..., None], 3, -1)), atol=1e-6)
    batch = np.stack([np.repeat(gray[..., None], 3, -1)] * 2)
    assert loaded.encode_image(batch).shape == (2, loaded.model.towers.embed_dim)


@pytest.mark.parametrize(
    "image, error, match",
    [
        (np.full((32, 32, 3), 0.5, np.float32), TypeError, "uint8 in 0-255"),
        (np.full((32, 32, 3), np.nan, np.float32), TypeError, "uint8 in 0-255"),
        (np.zeros((32, 32, 2), np.uint8), ValueError, r"\[H, W, 3\]"),
        (np.zeros((2, 2, 32, 32, 3), np.uint8), ValueError, r"a batch \[n, H, W, C\]"),
        ("cat.jpg", TypeError, "PIL image"),
        ([np.zeros((8, 8, 3), np.uint8), 7], TypeError, "not int"),
    ],
)
def test_encode_image_refuses_what_it_cannot_read_saying_what_it_takes(loaded, image, error, match):
    with pytest.raises(error, match=match):
        loaded.encode_image(image)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/tinyy.py"], "--config=configs/tinyy.py: cannot load the config file: [Errno 2]"),
        (["--config=configs/tiny.py", "--config.seed=99999999999999999999"], "config.seed=9999999999"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(args, message, tmp_path):
    out = subprocess.run([sys.executable, TRAIN, f"--workdir={tmp_path}", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: {out.stderr.strip()[7:]}"]  # one line
    assert message in out.stderr


@contextlib.contextmanager
def _small_filesystem(path, megabytes: int):
    """A tmpfs of `megabytes` at `path` (root can mount one); None when mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0  # fmt: skip
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_during_an_async_save_stops_the_run_at_a_step_boundary_with_the_last_checkpoint_intact(
    demo_cache, tmp_path, monkeypatch
):
    workdir = tmp_path / "small"
    config = _config(demo_cache, total_steps=8, checkpoint_every=2, keep_checkpoints=3)
    with _small_filesystem(workdir, 6) as mounted:  # room for one checkpoint of the tiny model (3.7 MB)
        if not mounted:  # a stand-in: the background save fails as on a full disk
            import orbax.checkpoint as ocp

            calls = []

            def full_after_first(self):
                calls.append(1)
                if len(calls) > 3:
                    raise OSError(28, "No space left on device")

            monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", full_after_first)
        # The background save fails, or the logs written meanwhile do: either names the place and the space.
        with pytest.raises((CheckpointSaveError, OSError)) as info:
            loop.train(config, str(workdir))
        message = str(info.value)
        assert str(workdir) in message and "free" in message, message
        if isinstance(info.value, CheckpointSaveError):
            assert "previous checkpoint is intact: step 2" in message
        params, meta = restore_params(str(workdir), step=2)
        assert meta["step"] == 2 and np.isfinite(np.asarray(params["logit_scale"]))
        logged = [json.loads(line)["step"] for line in open(workdir / METRICS_FILE)]
        assert max(logged) < 8  # stopped there, not at the end
