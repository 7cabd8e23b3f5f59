"""Where a run's numbers go: WORKDIR/metrics.jsonl, WORKDIR/eval.jsonl and TensorBoard.

Only process 0 writes (the others get a writer that does nothing). A line is a
JSON object with "step" first; non-finite values are written as null (JSON
has no NaN). On resume from step S, lines after S (written by the run that
died after its last checkpoint) are dropped, and TensorBoard is told to purge
events after S, so every step appears once, with the value of the run that
the checkpoints continue. Reading the files back: veclip_jax/run/workdir.py
`read_jsonl`.

TensorBoard events are written synchronously (tensorboardX's record writer,
without its background thread): a few scalars per logged step cost nothing,
and a failed write (a full disk) raises here instead of killing a writer
thread and then blocking the trainer forever on its full queue.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from veclip_jax.fileio import append_text, as_path, atomic_write_text, is_local, json_safe
from veclip_jax.run.workdir import EVAL_FILE, METRICS_FILE, TENSORBOARD_DIR


def _truncate(path: str, last_step: int) -> None:
    """Keeps the lines of `path` whose step is <= last_step (atomically)."""
    if not as_path(path).exists():
        return
    lines = as_path(path).read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    atomic_write_text(path, "".join(keep))


class _EventFile:
    """One TensorBoard event file, written synchronously; purges events after `purge_step` - 1.

    A remote logdir (gs://) is written locally and copied up after every flush: tensorboardX's own
    GCS writer needs google-cloud-storage, which the project does not install.
    """

    def __init__(self, logdir: str, purge_step: int):
        from tensorboardX.event_file_writer import EventsWriter  # no TensorFlow needed
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        self._remote = None if is_local(logdir) else as_path(logdir)
        if self._remote is not None:
            self._remote.mkdir(parents=True, exist_ok=True)
            logdir = tempfile.mkdtemp(prefix="veclip-tensorboard-")
        os.makedirs(logdir, exist_ok=True)
        self._logdir = logdir
        self._writer = EventsWriter(os.path.join(logdir, "events"))
        # What tensorboardX's SummaryWriter(purge_step=...) writes: TensorBoard hides later events.
        self._writer.write_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
        start = SessionLog(status=SessionLog.START)
        self._writer.write_event(Event(step=purge_step, wall_time=time.time(), session_log=start))
        self._flush()

    def _flush(self) -> None:
        self._writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self._remote is not None:
            for name in os.listdir(self._logdir):
                (self._remote / name).write_bytes(as_path(os.path.join(self._logdir, name)).read_bytes())

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        from tensorboardX.summary import scalar

        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                tag = f"{prefix}/{k}".replace("@", "_at_")  # TensorBoard tags: no "@"
                event = self._event(summary=scalar(tag, v), step=step, wall_time=time.time())
                self._writer.write_event(event)
        self._flush()

    def close(self) -> None:
        self._writer.close()
        if self._remote is not None:
            self._upload()
            shutil.rmtree(self._logdir, ignore_errors=True)


@contextlib.contextmanager
def _naming_failures(path: str) -> Iterator[None]:
    """An OSError while logging (a full disk) names the workdir and its free space."""
    try:
        yield
    except OSError as e:
        directory = os.path.dirname(path)
        try:
            free = f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free"
        except OSError:
            free = "free space unknown"
        raise OSError(e.errno, f"writing the logs in {directory} failed ({free}): {e.strerror or e}") from e


class MetricsWriter:
    """Appends training and evaluation metrics to the JSONL files and TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool, start_step: int):
        self.enabled = enabled
        self._tb: _EventFile | None = None
        if not enabled:
            return
        self.metrics_path = os.path.join(workdir, METRICS_FILE)
        self.eval_path = os.path.join(workdir, EVAL_FILE)
        for path in (self.metrics_path, self.eval_path):
            _truncate(path, start_step)
        self._tb = _EventFile(os.path.join(workdir, TENSORBOARD_DIR), purge_step=start_step + 1)

    def _append(self, path: str, step: int, values: dict[str, Any]) -> None:
        line = {"step": int(step)} | json_safe(values)
        append_text(path, json.dumps(line) + "\n")

    def train(self, step: int, values: dict[str, Any]) -> None:
        if self.enabled:
            with _naming_failures(self.metrics_path):
                self._append(self.metrics_path, step, values)
                self._tb.scalars("train", step, values)

    def eval(self, step: int, values: dict[str, Any]) -> None:
        if self.enabled:
            with _naming_failures(self.eval_path):
                self._append(self.eval_path, step, values)
                self._tb.scalars("eval", step, values)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
