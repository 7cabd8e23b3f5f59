"""The training loop: `train(config, workdir)`, one function read top to bottom.

  config check (once; it makes the run's objective) -> mesh -> input (the
  objective's batch keys) -> assembly (model, optimizer, shardings and the
  jitted step: train/assembly.py, shared with launch/compile.py) -> state
  (resumed, init_from or fresh) -> evaluator -> loop (step, log, evaluate,
  checkpoint, preemption) -> last checkpoint and evaluation

Rerunning with the same workdir resumes from its newest checkpoint: the
parameters, optimizer state and data iterator continue exactly, so a resumed
run logs the same per-step losses as one that never stopped. SIGTERM (a
preempted TPU VM, a cluster's time limit) saves a checkpoint at the current
step and returns normally.

Per-step metrics come back to the host one step late: step s's scalars are
read after step s+1 has been dispatched, so the device never waits on the
host. Every metric of every step is seen (window means in the logs, exact
non-finite streaks); metrics are logged by the names the step reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from veclip_jax.config import CheckedConfig, ConfigError, check_config, validate_layout
from veclip_jax.data.image_ops import EvalPreprocess
from veclip_jax.data.pipeline import DataSources, make_train_iterator, resolve_sources
from veclip_jax.data.skips import BAD_REASONS
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from veclip_jax.data.train_iterator import mix_ratios
from veclip_jax.eval.evaluator import Evaluator
from veclip_jax.eval.tasks import EvalContext
from veclip_jax.fileio import atomic_write_text, json_safe, normalize
from veclip_jax.hf.from_hf import check_same_model, import_params, is_hf_clip_dir
from veclip_jax.objectives import OBJECTIVE_PARAMS, Objective
from veclip_jax.objectives.model import variables
from veclip_jax.openclip import load as openclip_load
from veclip_jax.parallel.hardware import check_devices
from veclip_jax.parallel.mesh import global_batch, make_mesh
from veclip_jax.run.checkpoint import restore_variables
from veclip_jax.run.inference import Encoders
from veclip_jax.run.workdir import CHECKPOINTS, CONFIG_FILE, WorkdirLock, keep_tokenizer
from veclip_jax.train.assembly import Assembly, assemble
from veclip_jax.train.checkpoint import Checkpointer
from veclip_jax.train.metrics import MetricsWriter
from veclip_jax.train.preemption import Preemption
from veclip_jax.train.resume import check_saved_config
from veclip_jax.train.state import TrainState
from veclip_jax.train.step import STEP_APPLIED, STEP_GAUGES

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class EvaluationError(RuntimeError):
    """An evaluation failed and config.stop_on_eval_error asks to stop (the step was saved first)."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a call of `train` did."""

    step: int  # the last step done
    start_step: int  # the step it resumed from (0 = a fresh start)
    preempted: bool  # stopped early by SIGTERM (or `stop_after`), with a checkpoint
    checkpoint: str | None  # the directory of the last checkpoint saved, if any
    eval: dict[str, float]  # the last evaluation's metrics (empty if none ran)


def train(
    config: ml_collections.ConfigDict | CheckedConfig,
    workdir: str,
    *,
    devices: list[jax.Device] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Trains (or resumes training) `config` in `workdir`; see the module doc.

    Args:
      config: a config with the fields of veclip_jax/defaults.py (checked first), or the CLI's
        CheckedConfig (checked before JAX started; only the checks that need the devices run).
      workdir: checkpoints, metrics.jsonl, eval.jsonl, tensorboard/, config.json, the tokenizer.
      devices: the devices of the mesh (default: all).
      stop_after: at most this many steps in this call, then save and return
        (a job's time slice); the run resumes from there when called again.
    """
    # --- config: refused before any compute ------------------------------------------------------
    devices = list(devices if devices is not None else jax.devices())
    checked = _check_config(config, devices)  # the hardware's mesh rule applied
    # The run's one objective (made while checking): the input, the model, the step and the evals serve it.
    config, objective = checked.config, checked.objective
    workdir = normalize(workdir)  # local: absolute; gs://: as it is
    is_writer = jax.process_index() == 0
    total = config.total_steps

    # --- mesh ------------------------------------------------------------------------------------
    mesh = make_mesh(config.mesh, devices)
    log.info("mesh %s over %d %s device(s), %d process(es)", dict(mesh.shape), mesh.size,
             devices[0].platform, jax.process_count())  # fmt: skip

    # --- model, optimizer, shardings and the train step: one jitted function of (state, batch),
    # state donated; the same assembly launch/compile.py compiles for a pod. Built (nothing compiled
    # or allocated yet) before the workdir is touched: a mesh that cannot shard it is refused here ----
    run = assemble(config, mesh, objective=objective)

    # --- SIGTERM from here on is a request to stop (set-up can take minutes on a pod); the workdir:
    # one trainer at a time (WorkdirBusyError names the holder) ---------------------------------------
    preemption = Preemption().__enter__()
    lock = train_iter = ckpt = writer = None
    try:
        lock = WorkdirLock(workdir).acquire() if is_writer else None
        # --- input (sources resolved once; the demo data is generated on first use) ---------------
        sources = resolve_sources(config)
        t = config.model.text
        # Read (so checked: TokenizerError names it) before it is kept: a junk file never enters the workdir.
        tokenizer = load_tokenizer(sources.tokenizer, t.context_length, pad_id=t.pad_id, eos_id=t.eos_id)
        keep_tokenizer(workdir, sources.tokenizer, writer=is_writer)
        train_iter = make_train_iterator(config, sources=sources, tokenizer=tokenizer, keys=objective.inputs)

        # --- state: resume from this workdir, else init_from, else fresh ---------------------------
        ckpt = Checkpointer(
            os.path.join(workdir, CHECKPOINTS),
            keep=config.keep_checkpoints,
            async_save=config.async_checkpointing,
        )
        state, start, streak = _initial_state(config, ckpt, run, train_iter)
        if is_writer:  # the config this workdir now runs (after the resume checks passed)
            text = config.to_json_best_effort(indent=1, sort_keys=True)
            atomic_write_text(os.path.join(workdir, CONFIG_FILE), text)
        if start >= total:
            log.info("step %d >= total_steps=%d: nothing to train", start, total)

        # --- evaluation ----------------------------------------------------------------------------
        evaluator = _make_evaluator(config, sources, run, tokenizer)

        # --- the loop ------------------------------------------------------------------------------
        writer = MetricsWriter(workdir, enabled=is_writer, start_step=start)
        monitor = _Monitor(config, writer, train_iter, start, streak, int(state.nonfinite_steps), is_writer,
                           objective=objective)  # fmt: skip
        saved_step = start or None
        last_eval: dict[str, float] = {}
        pending: tuple[int, dict[str, jax.Array]] | None = None
        preempted = False
        last_step = start
        end = total if stop_after is None else min(total, start + stop_after)
        if preemption.requested and start < end:  # SIGTERM during set-up: nothing new to save
            log.warning("SIGTERM before the first step: stopping with nothing trained in this call; "
                        "rerun the same command to resume")  # fmt: skip
            end = start
            preempted = True
        for step in range(start + 1, end + 1):
            state, metrics = run.step(state, global_batch(mesh, next(train_iter)))
            ckpt.check()  # a background save that failed (a full disk) stops the run here
            if pending is not None:
                monitor.record(*pending, last_checkpoint=_describe(ckpt, saved_step))  # done, or nearly
            pending, last_step = (step, metrics), step
            preempted = preemption.reached(step) or (step == end and end < total)
            eval_due = evaluator is not None and evaluator.due(step, total)
            save_due = (config.checkpoint_every and step % config.checkpoint_every == 0) or step == total
            log_due = step % config.log_every == 0 or step == end or preempted
            if log_due or eval_due or save_due:
                monitor.record(*pending, last_checkpoint=_describe(ckpt, saved_step))
                pending = None
                if log_due:
                    monitor.log(step)
            with monitor.paused():  # speed counts training time only
                # Save first: an evaluation that fails (or kills the process) loses nothing trained.
                if save_due or preempted:
                    _save(ckpt, step, state, train_iter, monitor.streak, config)
                    saved_step = step
                if eval_due:
                    result = _evaluate(
                        evaluator,
                        variables(state.params, state.model_state),
                        step,
                        total,
                        writer,
                        monitor,
                        ckpt,
                    )
                    last_eval = last_eval if result is None else result
            if preempted:
                break
        ckpt.wait()  # inside the preemption context: a repeated SIGTERM cannot cut the save short
        if preempted and is_writer and last_step > start:
            log.warning("stopped at step %d: checkpoint saved to %s; rerun the same command to resume",
                        last_step, ckpt.step_dir(last_step))  # fmt: skip
        if is_writer and last_step > start:
            log.info("done: step %d of %d in %s (this call: %s)", last_step, total, workdir,
                     _duration(time.perf_counter() - monitor.run_start))  # fmt: skip
        return TrainResult(
            step=last_step,
            start_step=start,
            preempted=preempted,
            checkpoint=ckpt.step_dir(saved_step) if saved_step else None,
            eval=last_eval,
        )
    finally:
        # A save in flight completes (or fails) before we leave; then everything is closed. A
        # failure here never hides the error that ended the run (it is logged instead).
        _close_all(
            train_iter.close if train_iter is not None else None,
            writer.close if writer is not None else None,
            ckpt.wait if ckpt is not None else None,
            ckpt.close if ckpt is not None else None,
            lock.release if lock is not None else None,
            lambda: preemption.__exit__(None, None, None),  # SIGTERM absorbed until the save is committed
            failing=sys.exc_info()[1] is not None,
        )


# --- the stages' helpers, in the order `train` uses them ------------------------------------------


def _check_config(
    config: ml_collections.ConfigDict | CheckedConfig, devices: list[jax.Device]
) -> CheckedConfig:
    """The config to train and its objective, after every check that needs no compute: the
    hardware's rule applied, fields, the devices, the mesh and batch layout, init_from's sizes.

    A CheckedConfig (the CLI's, checked before JAX started) is not checked again: only what needs
    the devices runs. A plain config (a call from Python) gets every check.
    """
    num_devices, processes = len(devices), jax.process_count()
    if isinstance(config, CheckedConfig):
        checked = config
        config = checked.verified()
        validate_layout(config, num_devices, processes)
    else:
        checked = check_config(config, num_devices=num_devices, process_count=processes)
        config = checked.config
    check_devices(config.hardware, devices)
    if config.init_from and is_hf_clip_dir(config.init_from):
        try:
            check_same_model(config.init_from, config.model)
        except ValueError as e:
            raise ConfigError(f"config.init_from: {e}") from None
    elif config.init_from and openclip_load.is_open_clip(config.init_from):
        try:
            openclip_load.check_same_model(config.init_from, config.model)
        except ValueError as e:
            raise ConfigError(f"config.init_from: {e}") from None
    return checked


def _initial_state(
    config: ml_collections.ConfigDict, ckpt: Checkpointer, run: Assembly, train_iter: Any
) -> tuple[TrainState, int, int]:
    """(state, start step, non-finite streak): the workdir's newest intact checkpoint, else
    init_from, else fresh. Restoring also moves `train_iter` to the checkpoint's position.
    """
    restored = ckpt.restore_latest(
        run.abstract_state(),
        train_iter,
        check_meta=lambda meta, step: check_saved_config(config, meta, step),
    )
    if restored is not None:
        state, meta, start = restored
        log.info("resumed from step %d (%s)", start, ckpt.step_dir(start))
        return state, start, int(meta.get("nonfinite_streak", 0))
    state = run.init_state(jax.random.key(config.seed))
    if config.init_from:
        # The towers (and temperature) come from init_from; the objective's own parameters start
        # fresh, since the source may have been trained with another objective (or none: HF).
        abstract = run.abstract_state()
        towers = {k: v for k, v in abstract.params.items() if k != OBJECTIVE_PARAMS}
        model_state = state.model_state
        if is_hf_clip_dir(config.init_from):
            params = import_params(config.init_from, towers)
            log.info("parameters from the HF CLIP directory %s", config.init_from)
        elif openclip_load.is_open_clip(config.init_from):  # BatchNorm running averages too, for a ResNet
            params, model_state = openclip_load.import_params(
                config.init_from, towers, abstract.model_state, config.model
            )
            log.info("parameters from the open_clip checkpoint %s", config.init_from)
        else:
            # A ResNet's BatchNorm running averages come with its parameters.
            params, model_state, meta = restore_variables(
                config.init_from, towers, abstract.model_state, partial=True
            )
            log.info("parameters from %s (step %s)", meta["checkpoint"], meta["step"])
        if OBJECTIVE_PARAMS in state.params:
            log.info("init_from: the objective's own parameters (%s) start fresh", OBJECTIVE_PARAMS)
        state = state.replace(params={**state.params, **params}, model_state=model_state)
    return state, 0, 0


def _make_evaluator(
    config: ml_collections.ConfigDict, sources: DataSources, run: Assembly, tokenizer: Tokenizer | HFTokenizer
) -> Evaluator | None:
    """The evaluations of `config.evals` on the training mesh, or None (eval_every=0, or no entry to run).

    Built before the first step, so a missing dataset stops the run at once.
    """
    if not config.eval_every:
        return None
    size = config.model.vision.image_size
    ctx = EvalContext(
        Encoders(
            run.model,
            run.mesh,
            variables(run.shardings.params, run.shardings.model_state),
            config.eval_batch_size,
            run.rules,
        ),
        tokenizer,
        # the evaluation transform that veclip_jax.load and export use (fast: the same arithmetic)
        EvalPreprocess(size, size, fast=config.eval_fast_decode),
        demo_files=sources.eval_files if sources.is_demo else (),
    )
    evaluator = Evaluator.from_entries(config.evals.to_dict(), ctx, every=config.eval_every)
    return evaluator if evaluator.tasks else None


def _evaluate(
    evaluator: Evaluator,
    params: Any,
    step: int,
    total: int,
    writer: MetricsWriter,
    monitor: _Monitor,
    ckpt: Checkpointer,
) -> dict[str, float] | None:
    """The due evaluations' metrics, written to eval.jsonl; None if they failed.

    A failure (an undecodable image in an eval folder, a full disk while writing
    eval.jsonl) is logged in one line and counted (`eval_failures` in the
    metrics), and training goes on: the step's checkpoint is already saved.
    With config.stop_on_eval_error the run stops instead (EvaluationError).
    """
    t0 = time.perf_counter()
    try:
        result = evaluator(params, step, total)
        writer.eval(step, result)
    except Exception as e:
        monitor.eval_failures += 1
        what = f"evaluation at step {step} failed: {type(e).__name__}: {_first_line(e)}"
        if monitor.config.stop_on_eval_error:
            ckpt.wait()  # the step's save, started before the evaluation, is committed first
            raise EvaluationError(
                f"{what}. config.stop_on_eval_error=True stops the run; last checkpoint: "
                f"{_describe(ckpt, ckpt.latest_step())}"
            ) from e
        log.error("%s; training goes on (%d failed evaluation(s); config.stop_on_eval_error=True would "
                  "stop the run)", what, monitor.eval_failures)  # fmt: skip
        return None
    if monitor.is_writer:
        shown = "  ".join(f"{k} {v:.3f}" for k, v in result.items())
        log.info("eval step %d (%.1f s): %s", step, time.perf_counter() - t0, shown)
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _save(
    ckpt: Checkpointer,
    step: int,
    state: TrainState,
    train_iter: Any,
    streak: int,
    config: ml_collections.ConfigDict,
) -> None:
    meta = {"step": step, "nonfinite_streak": streak, "config": config.to_dict()}
    ckpt.save(step, state, train_iter, json_safe(meta))


def _close_all(*closers: Callable[[], None] | None, failing: bool) -> None:
    """Runs every closer; re-raises the first failure unless the run is already failing."""
    first: BaseException | None = None
    for close in closers:
        if close is None:
            continue
        try:
            close()
        except Exception as e:
            if failing:
                log.error("while stopping after an error: %s: %s", type(e).__name__, e)
            elif first is None:
                first = e
    if first is not None:
        raise first


def _describe(ckpt: Checkpointer, step: int | None) -> str:
    return f"step {step} in {ckpt.step_dir(step)}" if step else "none"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _host_bad_counts(train_iter: Any) -> dict[str, float]:
    """The input's counters summed over processes (a collective: every process calls it).

    Skipped records by reason; with data.sources also per source, the examples
    seen per source ("examples/NAME") and the realised mixing ratio ("mix/NAME").
    """
    counters = train_iter.counters()  # the same keys on every process
    names = sorted(counters)
    counts = np.asarray([counters[k] for k in names], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
    totals = {k: int(c) for k, c in zip(names, counts, strict=True)}
    return totals | mix_ratios(totals)


class _Monitor:
    """The host side of the loop: each step's metrics, non-finite streaks, speed, and log lines."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        writer: MetricsWriter,
        train_iter: Any,
        start: int,
        streak: int,
        nonfinite_total: int,
        is_writer: bool,
        *,
        objective: Objective,
    ):
        self.config, self.writer, self.train_iter = config, writer, train_iter
        self.start, self.streak, self.nonfinite_total = start, streak, nonfinite_total
        self.eval_failures = 0  # evaluations that failed in this call (training went on)
        self.is_writer = is_writer
        # Metrics logged as the window's last value (values of the state: the learning rate, the
        # objective's temperature or bias), the others as its mean.
        self.gauges = (*STEP_GAUGES, *objective.gauges)
        self.window: list[dict[str, float]] = []  # host metrics of the steps since the last log line
        self.timed = 0  # steps of the window that count for speed (the first step of a call compiles)
        self.run_start = self.window_start = time.perf_counter()

    def record(self, step: int, device_metrics: dict[str, jax.Array], *, last_checkpoint: str) -> None:
        """Brings one step's metrics to the host; stops the run on too many skipped steps in a row."""
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if step == self.start + 1:
            log.info("first step, compilation included: %.1f s", time.perf_counter() - self.run_start)
            self.window_start = time.perf_counter()
        else:
            self.timed += 1
        if m[STEP_APPLIED] > 0:
            self.streak = 0
        else:
            self.streak += 1
            self.nonfinite_total += 1
            log.warning("step %d: non-finite loss or gradient (loss %s): update skipped", step, m["loss"])
            limit = self.config.max_nonfinite_steps
            if self.streak >= limit:
                raise NonFiniteTrainingError(
                    f"{self.streak} consecutive steps (to step {step}) had a non-finite loss or gradient "
                    f"(config.max_nonfinite_steps={limit}); their updates were skipped and nothing was "
                    f"saved after them. Last checkpoint: {last_checkpoint}. Lower "
                    "config.optim.learning_rate or check the data."
                )
        self.window.append(m)

    def log(self, step: int) -> None:
        """One metrics.jsonl line, TensorBoard point and console line for the window ending at `step`."""
        elapsed = time.perf_counter() - self.window_start
        finite = [m for m in self.window if m[STEP_APPLIED] > 0] or self.window
        step_time = elapsed / self.timed if self.timed else math.nan
        values: dict[str, float] = {}
        for name in self.window[-1]:
            if name == STEP_APPLIED:
                continue
            last = name in self.gauges
            values[name] = self.window[-1][name] if last else float(np.mean([m[name] for m in finite]))
        values |= {
            "images_per_sec": self.config.batch_size / step_time if self.timed else math.nan,
            "seconds_per_step": step_time,
            "nonfinite_steps": self.nonfinite_total,
            "eval_failures": self.eval_failures,
        }
        values |= _host_bad_counts(self.train_iter)
        self.writer.train(step, values)
        if self.is_writer:
            eta = (self.config.total_steps - step) * step_time if self.timed else 0.0
            bad = sum(values[r] for r in BAD_REASONS)
            log.info(
                "step %d/%d  loss %.4f  lr %.3g  scale %.1f  %.0f img/s  %.0f ms/step  ETA %s%s",
                step, self.config.total_steps, values["loss"], values.get("learning_rate", math.nan),
                values.get("logit_scale", math.nan), values["images_per_sec"], 1e3 * step_time,
                _duration(eta),
                f"  skipped records {bad}" if bad else "",
            )  # fmt: skip
        self.window, self.timed, self.window_start = [], 0, time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A context whose time does not count towards the training speed (evaluation, saving)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - t0
