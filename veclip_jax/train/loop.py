"""The training loop: `train(config, workdir)`, one function read top to bottom.

  config check -> mesh -> input -> model & optimizer -> state (resumed, init_from
  or fresh) -> train step -> evaluator -> loop (step, log, evaluate, checkpoint,
  preemption) -> last checkpoint and evaluation

Rerunning with the same workdir resumes from its newest checkpoint: the
parameters, optimizer state and data iterator continue exactly, so a resumed
run logs the same per-step losses as one that never stopped. SIGTERM (a
preempted TPU VM, a cluster's time limit) saves a checkpoint at the current
step and returns normally.

Per-step metrics come back to the host one step late: step s's scalars are
read after step s+1 has been dispatched, so the device never waits on the
host. Every metric of every step is seen (window means in the logs, exact
non-finite streaks).
"""

from __future__ import annotations

import dataclasses
import filecmp
import logging
import math
import os
import shutil
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from veclip_jax.config import ConfigError, validate_config
from veclip_jax.data.pipeline import BAD_REASONS, make_train_iterator, resolve_sources
from veclip_jax.data.tokenizer import load_tokenizer
from veclip_jax.eval.encoders import Encoders
from veclip_jax.eval.evaluator import Evaluator, load_labelled_set
from veclip_jax.export.hf import check_same_model, import_params, is_hf_clip_dir
from veclip_jax.models.clip import build_model
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.train.checkpoint import CHECKPOINTS, Checkpointer, restore_params
from veclip_jax.train.metrics import MetricsWriter
from veclip_jax.train.optim import learning_rate_schedule, make_optimizer
from veclip_jax.train.state import abstract_train_state, global_batch, init_train_state, state_shardings
from veclip_jax.train.step import make_train_step

log = logging.getLogger(__name__)

TOKENIZER_FILE = "spiece.model"  # the run's tokenizer, copied into the workdir
TOKENIZER_DIR = "tokenizer"  # ... or, for a HF tokenizer, its directory
CONFIG_FILE = "config.json"


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a call of `train` did."""

    step: int  # the last step done
    start_step: int  # the step it resumed from (0 = a fresh start)
    preempted: bool  # stopped early by SIGTERM (or `stop_after`), with a checkpoint
    checkpoint: str | None  # the directory of the last checkpoint saved, if any
    eval: dict[str, float]  # the last evaluation's metrics (empty if none ran)


class _Preemption:
    """Whether this job has been asked to stop (SIGTERM), agreed by all processes at one step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        # Multi-host: jax.distributed's preemption notifier owns SIGTERM and makes
        # every process see the request at the same step; one process: our handler.
        self._own_handler = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _Preemption:
        if self._own_handler:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint after the current step")
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def __exit__(self, *exc: Any) -> None:
        if self._own_handler:
            signal.signal(signal.SIGTERM, self._previous)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _host_bad_counts(train_iter: Any) -> dict[str, int]:
    """Skipped-record counts summed over processes (a collective: every process calls it)."""
    counts = np.asarray([train_iter.bad_counts()[r] for r in BAD_REASONS], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
    return {r: int(c) for r, c in zip(BAD_REASONS, counts, strict=True)}


def _keep_tokenizer(workdir: str, tokenizer_path: str) -> str:
    """Keeps a copy of the run's tokenizer in the workdir (process 0); returns the copy's path.

    The copy (a sentencepiece model as spiece.model, or a HF tokenizer directory
    as tokenizer/) makes the workdir self-contained for export and
    `veclip_jax.load`. A resumed run must use the same tokenizer.
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
    elif jax.process_index() == 0:
        tmp = f"{kept}.tmp{os.getpid()}"
        if is_dir:
            shutil.copytree(
                tokenizer_path, tmp, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")]
            )
        else:
            shutil.copyfile(tokenizer_path, tmp)
        os.replace(tmp, kept)
    return kept


def _check_same_model(config: ml_collections.ConfigDict, meta: dict[str, Any], step: int) -> None:
    saved = meta.get("config", {}).get("model")
    if saved is not None:
        now = ml_collections.ConfigDict(config.model.to_dict()).to_json_best_effort(sort_keys=True)
        then = ml_collections.ConfigDict(saved).to_json_best_effort(sort_keys=True)
        if now != then:
            raise ConfigError(
                f"config.model differs from the model of the checkpoint at step {step} in this workdir; "
                "resume with the same model section, or start a new workdir (init_from can start from it)"
            )


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: list[jax.Device] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Trains (or resumes training) `config` in `workdir`; see the module doc.

    Args:
      config: a config with the fields of configs/base.py (validated first).
      workdir: checkpoints, metrics.jsonl, eval.jsonl, tensorboard/, config.json, spiece.model.
      devices: the devices of the mesh (default: all).
      stop_after: at most this many steps in this call, then save and return
        (a job's time slice); the run resumes from there when called again.
    """
    # --- config: refused before any compute ----------------------------------------------------
    devices = list(devices if devices is not None else jax.devices())
    validate_config(config, num_devices=len(devices), process_count=jax.process_count())
    if config.init_from and is_hf_clip_dir(config.init_from):
        try:
            check_same_model(config.init_from, config.model)
        except ValueError as e:
            raise ConfigError(f"config.init_from: {e}") from None
    workdir = os.path.abspath(os.path.expanduser(workdir))
    is_writer = jax.process_index() == 0
    total = config.total_steps

    # --- mesh ------------------------------------------------------------------------------------
    mesh = make_mesh(config.mesh, devices)
    log.info("mesh %s over %d %s device(s), %d process(es)", dict(mesh.shape), mesh.size,
             devices[0].platform, jax.process_count())  # fmt: skip

    # --- input (generates the demo data on first use) ---------------------------------------------
    sources = resolve_sources(config)
    _keep_tokenizer(workdir, sources.tokenizer)
    text_cfg = config.model.text
    tokenizer = load_tokenizer(
        sources.tokenizer, text_cfg.context_length, pad_id=text_cfg.pad_id, eos_id=text_cfg.eos_id
    )
    train_iter = make_train_iterator(config)

    ckpt = None
    writer = MetricsWriter(workdir, enabled=False, start_step=0)
    try:
        # --- model and optimizer ---------------------------------------------------------------------
        model = build_model(config.model)
        lr_fn = learning_rate_schedule(config.optim, total)
        tx = make_optimizer(config.optim, total)
        shardings = state_shardings(model, tx, mesh)

        # --- state: resume from this workdir, else init_from, else fresh -------------------------------
        ckpt = Checkpointer(
            os.path.join(workdir, CHECKPOINTS),
            keep=config.keep_checkpoints,
            async_save=config.async_checkpointing,
        )
        start = ckpt.latest_step() or 0
        streak = 0
        if start:
            _check_same_model(config, ckpt.metadata(start), start)
            state, meta = ckpt.restore(start, abstract_train_state(model, tx, shardings), train_iter)
            streak = int(meta.get("nonfinite_streak", 0))
            log.info("resumed from step %d (%s)", start, ckpt.step_dir(start))
        else:
            state = init_train_state(model, tx, mesh, jax.random.key(config.seed)).state
            if config.init_from:
                abstract_params = abstract_train_state(model, tx, shardings).params
                if is_hf_clip_dir(config.init_from):
                    params = import_params(config.init_from, abstract_params)
                    log.info("parameters from the HF CLIP directory %s", config.init_from)
                else:
                    params, meta = restore_params(config.init_from, abstract_params)
                    log.info("parameters from %s (step %s)", meta["checkpoint"], meta["step"])
                state = state.replace(params=params)
        if is_writer:  # the config this workdir now runs (after the resume checks passed)
            with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
                f.write(config.to_json_best_effort(indent=1, sort_keys=True))
        if start >= total:
            log.info("step %d >= total_steps=%d: nothing to train", start, total)
        nonfinite_total = int(state.nonfinite_steps)

        # --- the train step: one jitted function of (state, batch), state donated ----------------------
        train_step = make_train_step(
            model, tx, mesh, shardings, grad_accum_steps=config.optim.grad_accum_steps, learning_rate_fn=lr_fn
        )

        # --- evaluation ---------------------------------------------------------------------------------
        evaluator = None
        if config.eval_every and sources.eval_files:
            eval_set = load_labelled_set(
                sources.eval_files, config.model.vision.image_size, config.eval.caption_field
            )
            encoders = Encoders(model, mesh, shardings.params, config.eval.batch_size)
            evaluator = Evaluator(
                encoders, eval_set, tokenizer, config.eval.templates.to_dict(), config.eval.recall_at
            )
            log.info("eval: %d images (%d skipped) from %s", len(eval_set.images), eval_set.skipped,
                     ",".join(sources.eval_files))  # fmt: skip
        elif config.eval_every:
            log.warning(
                "eval_every=%d but no eval data (config.eval.files): no evaluation", config.eval_every
            )

        writer = MetricsWriter(workdir, enabled=is_writer, start_step=start)
        last_eval: dict[str, float] = {}

        def evaluate(step: int) -> None:
            nonlocal last_eval
            t0 = time.perf_counter()
            last_eval = evaluator(state.params)
            writer.eval(step, last_eval)
            if is_writer:
                shown = "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in last_eval.items())
                log.info("eval step %d (%.1f s): %s", step, time.perf_counter() - t0, shown)

        saved_step = start if start else None

        def save(step: int) -> None:
            nonlocal saved_step
            meta = {"step": step, "nonfinite_streak": streak, "config": config.to_dict()}
            ckpt.save(step, state, train_iter, _json_safe(meta))
            saved_step = step

        # --- the loop ---------------------------------------------------------------------------------
        window: list[dict[str, float]] = []  # host metrics of the steps since the last log line
        timed = 0  # steps of the window that count for speed (the first step of a call compiles)
        window_start = run_start = time.perf_counter()
        pending: tuple[int, dict[str, jax.Array]] | None = None
        preempted = False

        def record(step: int, device_metrics: dict[str, jax.Array]) -> None:
            """Brings one step's metrics to the host; stops the run on too many skipped steps."""
            nonlocal streak, nonfinite_total, timed, window_start
            m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            if step == start + 1:
                log.info("first step, compilation included: %.1f s", time.perf_counter() - run_start)
                window_start = time.perf_counter()
            else:
                timed += 1
            if m["step_applied"] > 0:
                streak = 0
            else:
                streak += 1
                nonfinite_total += 1
                log.warning("step %d: non-finite loss or gradient (loss %s): update skipped", step, m["loss"])
                if streak >= config.max_nonfinite_steps:
                    last = f"step {saved_step} in {ckpt.step_dir(saved_step)}" if saved_step else "none"
                    raise NonFiniteTrainingError(
                        f"{streak} consecutive steps (to step {step}) had a non-finite loss or gradient "
                        f"(config.max_nonfinite_steps={config.max_nonfinite_steps}); their updates were "
                        f"skipped and nothing was saved after them. Last checkpoint: {last}. Lower "
                        "config.optim.learning_rate or check the data."
                    )
            window.append(m)

        def log_window(step: int) -> None:
            nonlocal window, window_start, timed
            elapsed = time.perf_counter() - window_start
            finite = [m for m in window if m["step_applied"] > 0] or window
            mean = lambda k: float(np.mean([m[k] for m in finite]))
            last = window[-1]
            step_time = elapsed / timed if timed else math.nan
            images_per_sec = config.batch_size / step_time if timed else math.nan
            values = {
                "loss": mean("loss"),
                "learning_rate": last["learning_rate"],
                "logit_scale": last["logit_scale"],
                "images_per_sec": images_per_sec,
                "i2t_accuracy": mean("i2t_accuracy"),
                "t2i_accuracy": mean("t2i_accuracy"),
                "grad_norm": mean("grad_norm"),
                "positive_similarity": mean("positive_similarity"),
                "negative_similarity": mean("negative_similarity"),
                "nonfinite_steps": nonfinite_total,
                "seconds_per_step": step_time,
            } | _host_bad_counts(train_iter)
            writer.train(step, values)
            if is_writer:
                eta = (total - step) * step_time if timed else 0.0
                bad = sum(values[r] for r in BAD_REASONS)
                log.info(
                    "step %d/%d  loss %.4f  lr %.3g  scale %.1f  %.0f img/s  %.0f ms/step  ETA %s%s",
                    step, total, values["loss"], values["learning_rate"], values["logit_scale"],
                    images_per_sec, 1e3 * values["seconds_per_step"], _duration(eta),
                    f"  skipped records {bad}" if bad else "",
                )  # fmt: skip
            window, timed, window_start = [], 0, time.perf_counter()

        last_step = start
        end = total if stop_after is None else min(total, start + stop_after)
        with _Preemption() as preemption:
            for step in range(start + 1, end + 1):
                batch = global_batch(mesh, next(train_iter))
                state, metrics = train_step(state, batch)
                if pending is not None:
                    record(*pending)  # the previous step: done, or about to be
                pending = (step, metrics)
                last_step = step
                preempted = preemption.reached(step) or (step == end and end < total)
                eval_due = evaluator is not None and (step % config.eval_every == 0 or step == total)
                save_due = (config.checkpoint_every and step % config.checkpoint_every == 0) or step == total
                if step % config.log_every == 0 or step == end or preempted or eval_due or save_due:
                    record(*pending)
                    pending = None
                    if step % config.log_every == 0 or step == end or preempted:
                        log_window(step)
                paused = time.perf_counter()
                if eval_due:
                    evaluate(step)
                if save_due or preempted:
                    save(step)
                window_start += time.perf_counter() - paused  # speed counts training time only
                if preempted:
                    break
        ckpt.wait()
        if preempted and is_writer:
            log.warning("stopped at step %d: checkpoint saved to %s; rerun the same command to resume",
                        last_step, ckpt.step_dir(last_step))  # fmt: skip
        if is_writer and last_step > start:
            took = time.perf_counter() - run_start
            log.info("done: step %d of %d in %s (this call: %s)", last_step, total, workdir, _duration(took))
        return TrainResult(
            step=last_step,
            start_step=start,
            preempted=preempted,
            checkpoint=ckpt.step_dir(saved_step) if saved_step else None,
            eval=last_eval,
        )
    finally:
        train_iter.close()
        writer.close()
        if ckpt is not None:
            try:
                ckpt.wait()  # a save in flight completes (or fails) before we leave
            finally:
                ckpt.close()


def _json_safe(x: Any) -> Any:
    """Tuples to lists and non-finite floats to None, recursively (JSON metadata)."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
