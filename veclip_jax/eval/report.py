"""Evaluation tables: one model's tasks in the paper's columns, and runs side by side.

  python launch/report.py WORKDIR [WORKDIR ...]   (veclip_jax/cli/report.py)

`results_table` is launch/eval.py's table: the VeCLIP paper's columns (COCO
and Flickr I2T / T2I R@1, ImageNet, ImageNet-V2 top-1), then a column per
further task. `eval_table` puts runs side by side: each workdir's final
evaluation (its eval.jsonl lines of the last step) and its config.json (for
the caption mix, `data.vecap_prob`). `make demo-table` uses it for the README's
AltText / mixed / VeCap comparison.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from veclip_jax.eval.registry import TITLES
from veclip_jax.run.workdir import CONFIG_FILE, EVAL_FILE, read_jsonl

# (metric, column suffix) shown per task type; retrieval first, as in the paper's table.
_HEADLINE = {
    "retrieval": (("text_retrieval_recall@1", "I2T R@1"), ("image_retrieval_recall@1", "T2I R@1")),
    "zeroshot_classification": (("acc1", ""),),
    "linear_probe": (("lp_acc1", "linear probe"),),
}


def _paper_order(tasks: list[str]):
    """Sort key: the standard tasks first, in the paper's order (TITLES), then the others as given."""
    order = list(TITLES)
    return lambda t: order.index(t) if t in order else len(order) + tasks.index(t)


def results_table(
    results: Mapping[str, Mapping[str, float]], types: Mapping[str, str], model: str = "model"
) -> str:
    """A Markdown table, one row for the model: each task's headline metric(s) in %, paper's order."""
    cols = []
    for kind, shown in _HEADLINE.items():
        tasks = [t for t in results if types[t] == kind]
        for task in sorted(tasks, key=_paper_order(tasks)):
            base = task.removeprefix("linear_probe_") if kind == "linear_probe" else task
            title = TITLES.get(base, base)
            cols += [(f"{title} {suffix}".strip(), results[task].get(metric)) for metric, suffix in shown]
    header = "| model | " + " | ".join(c for c, _ in cols) + " |"
    cells = [f"{100 * v:.2f}" if v is not None else "-" for _, v in cols]
    return "\n".join([header, "|---" * (len(cols) + 1) + "|", f"| {model} | " + " | ".join(cells) + " |"])


def final_eval(workdir: str) -> dict | None:
    """The final evaluation of a workdir: its eval.jsonl lines of the last step, merged; None if none."""
    path = os.path.join(workdir, EVAL_FILE)
    if not os.path.exists(path):
        return None
    lines = read_jsonl(path)
    if not lines:
        return None
    last = max(line["step"] for line in lines)
    merged: dict = {}
    for line in lines:
        if line["step"] == last:
            merged |= line
    return merged


def _column_name(workdir: str) -> str:
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            p = json.load(f)["data"]["vecap_prob"]
        return f"{os.path.basename(os.path.normpath(workdir))} (vecap_prob={p:g})"
    except (OSError, KeyError, ValueError, TypeError):
        return os.path.basename(os.path.normpath(workdir))


def eval_table(workdirs: Sequence[str]) -> str:
    """A Markdown table: a row per metric, a column per workdir (values in %)."""
    evals = [final_eval(w) for w in workdirs]
    metrics = sorted(
        {k for e in evals if e for k in e if k != "step"}, key=lambda k: ("retrieval" in k, k)
    )
    if not metrics:
        return "no evaluation found in " + ", ".join(workdirs)
    header = "| metric (%) | " + " | ".join(_column_name(w) for w in workdirs) + " |"
    rows = [header, "|---" * (len(workdirs) + 1) + "|"]
    rows.append("| step | " + " | ".join(str(e["step"]) if e else "-" for e in evals) + " |")
    for m in metrics:
        cells = [f"{100 * e[m]:.1f}" if e and e.get(m) is not None else "-" for e in evals]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def print_eval_table(workdirs: Sequence[str]) -> None:
    """Prints `eval_table` (nothing if no workdir has an evaluation)."""
    if any(final_eval(w) for w in workdirs):
        print(eval_table(workdirs))
