"""The training loop: exact resume, the same run on any mesh, SIGTERM, checkpoints that survive failures,
non-finite steps, logging and evaluation, init_from."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import signal
import struct
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import veclip_jax
from tests.helpers import TINY_RUN_STEPS, tiny_run_config
from veclip_jax.data import captions, demo, records
from veclip_jax.eval.datasets import load_image
from veclip_jax.run.checkpoint import restore_params
from veclip_jax.run.workdir import read_jsonl
from veclip_jax.train import loop
from veclip_jax.train.checkpoint import Checkpointer, CheckpointSaveError
from veclip_jax.train.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
K = TINY_RUN_STEPS // 2  # steps before the interruption in the resume tests


def _config(demo_cache: str, **fields):
    return tiny_run_config(demo_cache, **fields)


def _losses(workdir: str) -> list[float]:
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))
    return [m["loss"] for m in lines]


@pytest.fixture()
def straight(tiny_run):
    return tiny_run


# --- exact resume -------------------------------------------------------------------------------


def test_resume_continues_identical_losses_and_evaluations(straight, demo_cache, tmp_path):
    first = loop.train(_config(demo_cache), str(tmp_path), stop_after=K)
    assert first.step == K and first.preempted
    # What a process killed in the middle of its next save leaves behind: ignored, then removed.
    leftover = tmp_path / "checkpoints" / f"{2 * K}.orbax-checkpoint-tmp"
    (leftover / "params").mkdir(parents=True)
    second = loop.train(_config(demo_cache), str(tmp_path))
    assert second.start_step == K and second.step == 2 * K
    assert not leftover.exists()
    assert _losses(str(tmp_path)) == _losses(straight[0])  # bit for bit
    evals = [read_jsonl(os.path.join(w, "eval.jsonl")) for w in (str(tmp_path), straight[0])]
    assert evals[0] == evals[1]


def test_rerun_of_a_finished_run_trains_nothing(straight, demo_cache):
    workdir, _ = straight
    before = _losses(workdir)
    again = loop.train(_config(demo_cache, keep_checkpoints=1), workdir)
    assert again.step == again.start_step == 2 * K
    assert _losses(workdir) == before


# --- the same run on any mesh ---------------------------------------------------------------------

MESH_STEPS = 40


@pytest.fixture(scope="module")
def one_device(demo_cache, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    config = _config(demo_cache, total_steps=MESH_STEPS, eval_every=0, checkpoint_every=0)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    loop.train(config, workdir, devices=jax.devices()[:1])
    return _losses(workdir)


def test_same_losses_on_one_device_and_on_data2_fsdp4(one_device, demo_cache, tmp_path):
    config = _config(demo_cache, total_steps=MESH_STEPS, eval_every=0, checkpoint_every=0)
    config.mesh.update(data=2, fsdp=4, tensor=1)
    loop.train(config, str(tmp_path))
    np.testing.assert_allclose(_losses(str(tmp_path)), one_device, rtol=1e-5)


def test_loss_falls_on_the_demo_data(one_device):
    # Chance is log(32) = 3.47 for a batch of 32; the first steps sit near it.
    assert np.mean(one_device[:5]) > 3.3
    assert np.mean(one_device[-5:]) < np.mean(one_device[:5]) - 0.4, one_device


# --- logging, evaluation, checkpoints ---------------------------------------------------------------


def test_metrics_jsonl_has_a_line_per_logged_step(straight):
    workdir, _ = straight
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in lines] == list(range(1, 2 * K + 1))
    for key in ("loss", "learning_rate", "logit_scale", "images_per_sec", "bad_record", "empty_caption",
                "undecodable_image", "nonfinite_steps"):  # fmt: skip
        assert key in lines[-1], key
    assert lines[-1]["nonfinite_steps"] == 0


def test_logged_learning_rate_is_the_schedules_rate_of_each_update(straight, demo_cache):
    lines = read_jsonl(os.path.join(straight[0], "metrics.jsonl"))
    config = _config(demo_cache)
    peak, warmup, total = config.optim.learning_rate, config.optim.warmup_steps, config.total_steps

    def rate(updates_before: int) -> float:  # linear warmup from 0, then cosine to end_lr_ratio * peak
        if updates_before < warmup:
            return peak * updates_before / warmup
        end = peak * config.optim.end_lr_ratio
        progress = (updates_before - warmup) / (total - warmup)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

    assert [m["learning_rate"] for m in lines] == pytest.approx([rate(s - 1) for s in range(1, 2 * K + 1)])
    assert lines[0]["learning_rate"] == 0.0 and lines[warmup]["learning_rate"] == pytest.approx(peak)


def test_images_per_sec_is_the_batch_over_the_step_time(straight, demo_cache):
    lines = read_jsonl(os.path.join(straight[0], "metrics.jsonl"))
    batch = _config(demo_cache).batch_size
    assert lines[0]["images_per_sec"] is None  # the first step compiles: no speed (logged as null)
    for m in lines[1:]:
        assert m["images_per_sec"] == pytest.approx(batch / m["seconds_per_step"]), m


def test_images_per_sec_counts_training_time_only(demo_cache, tmp_path, monkeypatch):
    # A fake clock: each train step takes 0.25 s, each evaluation and checkpoint save 100 s.
    clock = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def taking(seconds, fn):
        def timed(*args, **kwargs):
            out = fn(*args, **kwargs)
            clock[0] += seconds
            return out

        return timed

    def timed_step(*args, **kwargs):
        run = assemble(*args, **kwargs)
        return dataclasses.replace(run, step=taking(0.25, run.step))

    assemble = loop.assemble
    monkeypatch.setattr(loop, "assemble", timed_step)
    monkeypatch.setattr(loop, "_evaluate", taking(100.0, loop._evaluate))
    monkeypatch.setattr(loop, "_save", taking(100.0, loop._save))
    config = _config(demo_cache)  # log_every=1, evaluating and saving every K steps
    loop.train(config, str(tmp_path))
    lines = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [m["images_per_sec"] for m in lines] == [None] + [config.batch_size / 0.25] * (2 * K - 1)
    assert [m["seconds_per_step"] for m in lines] == [None] + [0.25] * (2 * K - 1)


def test_evaluation_every_eval_every_steps_and_at_the_end(straight):
    workdir, result = straight
    lines = read_jsonl(os.path.join(workdir, "eval.jsonl"))
    assert [m["step"] for m in lines] == [K, 2 * K]
    assert result.eval == {k: v for k, v in lines[-1].items() if k != "step"}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_evaluation_is_a_hand_count_on_the_held_out_split_with_the_saved_parameters(straight, demo_cache):
    workdir, result = straight
    model = veclip_jax.load(workdir)  # the last checkpoint: the parameters of the last evaluation
    config = _config(demo_cache)
    held_out = list(records.RecordReader([demo.ensure_demo_data(demo_cache).eval_file]))
    images = model.encode_image([load_image(r.jpeg) for r in held_out])  # as the evaluator reads them
    want = {}
    for name, entry in config.evals.items():
        if entry.type != "zeroshot_classification":
            continue
        attribute = entry.label_field
        classes = sorted({r.labels[attribute] for r in held_out})
        prompts = [model.encode_text([t.format(c) for t in entry.templates]) for c in classes]
        class_embeds = _unit(np.stack([p.mean(axis=0) for p in prompts]))  # averaged over templates
        order = np.argsort(-(images @ class_embeds.T), axis=1, kind="stable")
        truth = np.array([classes.index(r.labels[attribute]) for r in held_out])
        want[f"{name}/acc1"] = float(np.mean(order[:, 0] == truth))
        want[f"{name}/acc5"] = float(np.mean(np.any(order[:, :5] == truth[:, None], axis=1)))
        recalls = [np.mean(order[truth == c, 0] == c) for c in range(len(classes)) if np.any(truth == c)]
        want[f"{name}/mean_per_class_recall"] = float(np.mean(recalls))
    sims = images @ model.encode_text([captions.clean_caption(r.vecap_text) for r in held_out]).T
    for k in config.evals.demo_retrieval.recall_at:
        ranks_i2t = (sims > np.diag(sims)[:, None]).sum(axis=1)  # captions above an image's own caption
        ranks_t2i = (sims > np.diag(sims)[None, :]).sum(axis=0)
        want[f"demo_retrieval/text_retrieval_recall@{k}"] = float(np.mean(ranks_i2t < k))
        want[f"demo_retrieval/image_retrieval_recall@{k}"] = float(np.mean(ranks_t2i < k))
    assert len(held_out) == 512 and all(r.vecap_text for r in held_out)
    # Exactly: the run's 8 data shards embed each example as one device does.
    assert result.eval == want


def _tensorboard_tags(workdir: str) -> set[str]:
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
        data, i = open(path, "rb").read(), 0
        while i < len(data):  # TFRecord framing: length, crc, event, crc
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            tags.update(v.tag for v in event.summary.value)
            i += 12 + n + 4
    return tags


def test_tensorboard_events_hold_train_and_eval_scalars(straight):
    tags = _tensorboard_tags(straight[0])
    want = {"train/loss", "train/learning_rate", "train/images_per_sec", "eval/demo_color/acc1"}
    assert want | {"eval/demo_retrieval/text_retrieval_recall_at_1"} <= tags


def test_workdir_keeps_config_tokenizer_and_the_newest_checkpoints(straight):
    workdir, result = straight
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.path.exists(os.path.join(workdir, "spiece.model"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(2 * K)]  # keep_checkpoints=1
    assert result.checkpoint == os.path.join(workdir, "checkpoints", str(2 * K))


def test_metrics_writer_drops_lines_after_the_resumed_step(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True, start_step=0)
    for step in range(1, 11):
        writer.train(step, {"loss": float(step)})
    writer.close()
    MetricsWriter(str(tmp_path), enabled=True, start_step=6).close()
    assert [m["step"] for m in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]


def test_only_the_writing_process_writes(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=False, start_step=0)
    writer.train(1, {"loss": 1.0})
    writer.eval(1, {"x": 1.0})
    writer.close()
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_last_good_checkpoint(demo_cache, tmp_path, monkeypatch):
    original, calls = ocp.StandardCheckpointHandler.async_save, []

    async def fail_second_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # two items per save: params, train
            raise OSError("disk full (simulated)")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fail_second_save)
    with pytest.raises(CheckpointSaveError, match=r"step 8 .*disk full \(simulated\).*intact: step 4"):
        loop.train(_config(demo_cache, eval_every=0), str(tmp_path))
    monkeypatch.undo()
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() == K  # the failed step-2K save replaced nothing
    ckpt.close()
    result = loop.train(_config(demo_cache, eval_every=0), str(tmp_path))
    assert result.start_step == K and result.step == 2 * K


def test_non_finite_steps_in_a_row_stop_the_run_with_the_checkpoint_intact(demo_cache, tmp_path, monkeypatch):
    original, calls = loop.global_batch, []

    def nan_after_k(mesh, local):
        calls.append(1)
        if len(calls) > K:
            local = dict(local, image=np.full(local["image"].shape, np.nan, np.float32))
        return original(mesh, local)

    monkeypatch.setattr(loop, "global_batch", nan_after_k)
    config = _config(demo_cache, eval_every=0, total_steps=20, max_nonfinite_steps=3)
    with pytest.raises(
        loop.NonFiniteTrainingError, match=f"3 consecutive steps .* Last checkpoint: step {K}"
    ):
        loop.train(config, str(tmp_path))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [K]
    ckpt.close()
    lines = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert lines[K]["loss"] is None and lines[K]["nonfinite_steps"] == 1  # logged, as null


def test_init_from_starts_from_another_runs_parameters(straight, demo_cache, tmp_path):
    source, _ = straight
    config = _config(demo_cache, total_steps=1, eval_every=0, init_from=source)
    config.optim.update(learning_rate=1e-12, warmup_steps=0)  # one step that moves nothing measurable
    result = loop.train(config, str(tmp_path))
    got, _ = restore_params(result.checkpoint)
    want, meta = restore_params(source)
    assert meta["step"] == 2 * K
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), got, want)
    assert max(jax.tree.leaves(diffs)) < 1e-6


def test_resume_refuses_a_different_model(straight, demo_cache):
    config = _config(demo_cache, keep_checkpoints=1)
    config.model.embed_dim = 48
    with pytest.raises(loop.ConfigError, match="config.model differs"):
        loop.train(config, straight[0])


# --- SIGTERM ------------------------------------------------------------------------------------------


def test_sigterm_saves_exits_cleanly_and_the_workdir_resumes(demo_cache, tmp_path):
    steps = 30
    cmd = [sys.executable, TRAIN, "--config=configs/tiny.py", f"--workdir={tmp_path}",
           f"--config.data.cache_dir={demo_cache}", f"--config.total_steps={steps}",
           "--config.eval_every=0", "--config.checkpoint_every=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = read_jsonl(str(metrics))[-1]["step"]
    assert stopped < steps, "the run ended before SIGTERM; nothing was tested"
    assert f"checkpoint saved to {tmp_path}/checkpoints/{stopped}" in out

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped}" in resumed.stderr
    assert [m["step"] for m in read_jsonl(str(metrics))] == list(range(1, steps + 1))
