"""Where a run's numbers go: WORKDIR/metrics.jsonl, WORKDIR/eval.jsonl and TensorBoard.

Only process 0 writes (the others get a writer that does nothing). A line is a
JSON object with "step" first; non-finite values are written as null (JSON
has no NaN). On resume from step S, lines after S (written by the run that
died after its last checkpoint) are dropped, and TensorBoard is told to purge
events after S, so every step appears once, with the value of the run that
the checkpoints continue.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float | int) and not isinstance(value, bool):
        value = float(value) if isinstance(value, float) else int(value)
        return value if not isinstance(value, float) or math.isfinite(value) else None
    return value


def _truncate(path: str, last_step: int) -> None:
    """Keeps the lines of `path` whose step is <= last_step (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The lines of a metrics or eval file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends training and evaluation metrics to the JSONL files and TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool, start_step: int):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.metrics_path = os.path.join(workdir, METRICS_FILE)
        self.eval_path = os.path.join(workdir, EVAL_FILE)
        for path in (self.metrics_path, self.eval_path):
            _truncate(path, start_step)
        from tensorboardX import SummaryWriter  # TensorBoard event files without TensorFlow

        self._tb = SummaryWriter(
            os.path.join(workdir, TENSORBOARD_DIR), purge_step=start_step + 1, flush_secs=30
        )

    def _append(self, path: str, step: int, values: dict[str, Any]) -> None:
        line = {"step": int(step)} | {k: _jsonable(v) for k, v in values.items()}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def _scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                self._tb.add_scalar(f"{prefix}/{k}".replace("@", "_at_"), v, step)  # TB tags: no "@"

    def train(self, step: int, values: dict[str, Any]) -> None:
        if self.enabled:
            self._append(self.metrics_path, step, values)
            self._scalars("train", step, values)

    def eval(self, step: int, values: dict[str, Any]) -> None:
        if self.enabled:
            self._append(self.eval_path, step, values)
            self._scalars("eval", step, values)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
