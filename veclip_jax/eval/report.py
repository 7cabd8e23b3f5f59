"""The final evaluation of one or more runs, side by side, as a Markdown table.

  python -m veclip_jax.eval.report WORKDIR [WORKDIR ...]

Reads each workdir's last eval.jsonl line and its config.json (for the
caption mix, `data.vecap_prob`). `make demo-table` uses it for the README's
AltText / mixed / VeCap comparison.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from veclip_jax.train.metrics import EVAL_FILE, read_jsonl


def final_eval(workdir: str) -> dict | None:
    """The last eval line of a workdir, or None if it has none."""
    path = os.path.join(workdir, EVAL_FILE)
    if not os.path.exists(path):
        return None
    lines = read_jsonl(path)
    return lines[-1] if lines else None


def _column_name(workdir: str) -> str:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            p = json.load(f)["data"]["vecap_prob"]
        return f"{os.path.basename(os.path.normpath(workdir))} (vecap_prob={p:g})"
    except (OSError, KeyError, ValueError, TypeError):
        return os.path.basename(os.path.normpath(workdir))


def eval_table(workdirs: Sequence[str]) -> str:
    """A Markdown table: a row per metric, a column per workdir (values in %)."""
    evals = [final_eval(w) for w in workdirs]
    metrics = sorted(
        {k for e in evals if e for k in e if k != "step"}, key=lambda k: (not k.startswith("zero"), k)
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


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(eval_table(sys.argv[1:]))
