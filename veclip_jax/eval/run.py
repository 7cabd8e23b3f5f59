"""Standalone evaluation of any model `veclip_jax.load` reads: `evaluate(path, tasks)`.

The library side of `launch/eval.py`: loads the model (our workdir or
checkpoint, a HF CLIP directory, a released VeCLIP checkpoint) with its own
tokenizer and preprocessing (through the run layer, veclip_jax/run/load.py,
as `veclip_jax.load` does), puts it on a data-parallel mesh over all
devices (every process of a multi-host job embeds its own slice), builds the
tasks (a workdir's `config.evals` entries by name, or the standard ones of
veclip_jax/eval/registry.py) and runs them with the code training uses.
Process 0 writes one CLIP_benchmark-style JSON file per task (with
`scoring`: "tokenwise" for a FILIP run's zero-shot and retrieval tasks,
"pooled" otherwise; veclip_jax/eval/tokenwise.py), appends the metrics to a
workdir's eval.jsonl, and returns the paper's table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer
from veclip_jax.eval import registry
from veclip_jax.eval.embed import Preprocess
from veclip_jax.eval.evaluator import Evaluator, flatten
from veclip_jax.eval.report import results_table
from veclip_jax.eval.tasks import BENCHMARK_TASK, EvalContext
from veclip_jax.fileio import append_text, as_path, atomic_write_text
from veclip_jax.objectives.model import ObjectiveModel, variables
from veclip_jax.parallel.mesh import make_mesh, replicated
from veclip_jax.run.inference import Encoders
from veclip_jax.run.load import LoadedModel, load_model
from veclip_jax.run.workdir import CONFIG_FILE, EVAL_FILE, RunPath, run_path

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalRun:
    """What `evaluate` did."""

    results: dict[str, dict[str, float]]  # task key -> metrics
    types: dict[str, str]  # task key -> task type
    table: str  # the Markdown table (paper's columns first)
    files: list[str]  # the JSON files written (process 0)
    step: int | None  # the checkpoint's step, for our runs
    images_per_sec: dict[str, float]  # task key -> embedding throughput of its last image pass
    scoring: dict[str, str] = dataclasses.field(default_factory=dict)  # task key -> "tokenwise" / "pooled"
    # Why the results could not be written (a full disk, no permission), or "": the metrics are still
    # here and in `table`, so the caller shows them before reporting the failure.
    write_error: str = ""


def _run_of(source: str) -> RunPath | None:
    """The run a loaded model comes from, if it is a checkpoint in a workdir of ours (with its config)."""
    if not as_path(source).is_dir():  # a bare state dict (open_clip): no run of ours
        return None
    run = run_path(source)
    if run.workdir and run.step is not None and as_path(os.path.join(run.workdir, CONFIG_FILE)).exists():
        return run
    return None


def task_entries(names: Sequence[str], run_config: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """name -> registry entry: an entry of the run's config.evals by its name, else a standard task.

    No names: all of the run's entries.
    """
    evals = dict((run_config or {}).get("evals", {}))
    if not names:
        if not evals:
            raise ValueError("no --tasks given, and the model has no config.evals to run")
        names = list(evals)
    out: dict[str, dict[str, Any]] = {}
    given: dict[str, str] = {}  # key -> the name that gave it
    for n in names:
        key = n if n in evals else registry.task_key(n)
        if key in given:  # e.g. folder:/a/test and folder:/b/test: one result file would overwrite the other
            raise ValueError(f"--tasks: {given[key]!r} and {n!r} both name their results {key!r}; "
                             "evaluate them in separate runs (or rename a folder)")  # fmt: skip
        given[key] = n
        out[key] = dict(evals[n]) if n in evals else registry.standard_task(n)
    return out


def _demo_files(run_config: Mapping[str, Any] | None) -> list[str]:
    if not run_config or run_config.get("data", {}).get("train_files"):
        return []
    from veclip_jax.data.demo import ensure_demo_data  # generates the data on first use (seconds)

    return [ensure_demo_data(os.path.expanduser(run_config["data"]["cache_dir"])).eval_file]


def run_tasks(
    model: ObjectiveModel,
    host_params: Any,
    tokenizer: Tokenizer | HFTokenizer,
    preprocess: Preprocess,
    entries: Mapping[str, Mapping[str, Any]],
    *,
    data_dir: str = "",
    batch_size: int = 256,
    demo_files: Sequence[str] = (),
    progress: bool = False,
    devices: Sequence[jax.Device] | None = None,
    scoring: str | None = None,
) -> tuple[dict[str, dict[str, float]], Evaluator]:
    """Runs registry entries for a model given by its (numpy) variables on a data-parallel mesh.

    `host_params`: `objectives.model.variables(params, model_state)` ({"params": ...} and a
    ResNet's BatchNorm running averages).

    The mesh spans `devices` (default: all, of every process); the parameters
    are replicated. Every process of a multi-host job calls it alike.
    `scoring` ("pooled" / "tokenwise") overrides the one the model's objective
    implies (veclip_jax/eval/tokenwise.py).
    """
    mesh = make_mesh(dict(data=-1, fsdp=1, tensor=1), devices)
    rep = replicated(mesh)
    params = jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), rep, np.asarray(x).__getitem__), host_params
    )
    encoders = Encoders(model, mesh, jax.tree.map(lambda _: rep, host_params), batch_size, scoring=scoring)
    ctx = EvalContext(encoders, tokenizer, preprocess, data_dir, demo_files, progress)
    evaluator = Evaluator.from_entries(entries, ctx)
    if not evaluator.tasks:
        raise ValueError(f"none of the tasks {list(entries)} can run on this model")
    return evaluator.run(params), evaluator


def write_results(
    out: str, dumps: Mapping[str, Any], workdir: str | None, line: Mapping[str, Any]
) -> list[str]:
    """Writes a JSON file per task into `out` and, for a workdir, `line` into its eval.jsonl; returns
    the files. Through the path layer (epath): a gs:// workdir or output directory is written alike."""
    as_path(out).mkdir(parents=True, exist_ok=True)
    files = []
    for key, dump in dumps.items():
        files.append(os.path.join(out, f"{key}.json"))
        atomic_write_text(files[-1], json.dumps(dump, indent=1))
    if workdir:
        append_text(os.path.join(workdir, EVAL_FILE), json.dumps(line) + "\n")
    return files


def evaluate(
    path: str,
    tasks: Sequence[str] = (),
    *,
    data_dir: str = "",
    output_dir: str = "",
    batch_size: int = 256,
    tokenizer: str | None = None,
    step: int | None = None,
    max_examples: int = 0,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
    loaded: LoadedModel | None = None,
    model_name: str | None = None,
    fast_decode: bool = False,
) -> EvalRun:
    """Evaluates the model at `path` on `tasks` (see the module doc and registry.standard_task).

    Args:
      path: anything `veclip_jax.load` reads.
      tasks: task names; none = all entries of a workdir's config.evals.
      data_dir: root of the tasks' relative paths and TFDS's data_dir.
      output_dir: where the JSON files go (default WORKDIR/eval_results/step_N, else ./eval_results/NAME).
      batch_size: images or texts per global encoding batch.
      max_examples: evaluate the first N examples of each dataset only (0 = all).
      loaded: an already loaded model (e.g. a `veclip_jax.load` result; path then only names it).
      model_name: open_clip's model config (e.g. RN50) for a bare open_clip state dict at `path`.
      fast_decode: JPEGs decoded at reduced DCT scale and resized by torch (EvalPreprocess.fast):
        faster, not HF's exact pixels; refused for a model whose preprocessing is not bicubic.
    """
    loaded = loaded or load_model(path, tokenizer=tokenizer, step=step, model_name=model_name)
    preprocess = loaded.preprocess
    if fast_decode:
        if getattr(preprocess, "method", None) != "bicubic":
            method = getattr(preprocess, "method", type(preprocess).__name__)
            raise ValueError(f"--fast_decode resizes bicubic; this model's preprocessing is {method!r}")
        preprocess = dataclasses.replace(preprocess, fast=True)
    run = _run_of(loaded.source)
    workdir = run.workdir if run else None
    run_config = json.loads(as_path(os.path.join(workdir, CONFIG_FILE)).read_text()) if workdir else None
    step = run.step if run else None
    entries = task_entries(list(tasks), run_config)
    if max_examples:
        entries = {n: e | {"max_examples": max_examples} for n, e in entries.items()}
    uses_demo = any(e.get("dataset") == "demo" for e in entries.values())
    results, evaluator = run_tasks(
        loaded.model, jax.device_get(variables(loaded.params, loaded.model_state)), loaded.tokenizer,
        preprocess, entries,
        data_dir=data_dir, batch_size=batch_size, demo_files=_demo_files(run_config) if uses_demo else (),
        progress=progress, devices=devices,
    )  # fmt: skip
    types = {t.key: t.kind for t in evaluator.tasks}
    table = results_table(results, types, model=os.path.basename(os.path.normpath(path)))
    files: list[str] = []
    write_error = ""
    if jax.process_index() == 0:
        out = output_dir or (
            os.path.join(workdir, "eval_results", f"step_{step}") if workdir
            else os.path.join("eval_results", os.path.basename(os.path.normpath(path)))
        )  # fmt: skip
        size = ml_collections.ConfigDict(loaded.model_config).get("size", "custom")
        dumps = {
            task.key: {
                "dataset": task.key,
                "model": size,
                "pretrained": loaded.source,
                "task": BENCHMARK_TASK[task.kind],
                "metrics": results[task.key],
                "language": "en",
                "data": task.dataset,
                "step": step,
                "scoring": task.scoring,
            }
            for task in evaluator.tasks
        }
        try:  # each file atomically: a failure leaves no partial JSON behind
            files = write_results(out, dumps, workdir, {"step": step} | flatten(results))
        except OSError as e:
            write_error = f"writing the results to {out} failed: {type(e).__name__}: {e}"
    rates = {t.key: t.images_per_sec for t in evaluator.tasks}
    return EvalRun(results, types, table, files, step, rates, evaluator.scoring, write_error)
