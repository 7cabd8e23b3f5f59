"""The pipeline's last stage: batches made in grain worker processes (mp_prefetch) or a prefetch thread.

And the workers' lifetime: they exit with the trainer, however it dies
(`_exit_with_parent`), and they can read absl flags outside absl.app.run.
Everything a worker runs is unpickled there: no jax in this module nor in
what the workers import (data/preprocess.py, data/skip_and_batch.py).
"""

from __future__ import annotations

import math
import os
import threading

import grain
from grain.experimental import ThreadPrefetchIterDataset


def prefetch(ds: grain.IterDataset, *, num_workers: int, prefetch: int) -> grain.DatasetIterator:
    """`ds` run in `num_workers` worker processes (0: a thread), `prefetch` batches ready ahead in all."""
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        # data.prefetch is the total number of batches ready ahead, over all workers.
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=max(1, math.ceil(prefetch / num_workers))
            ),
            worker_init_fn=_exit_with_parent,
        )
    else:
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return iter(ds)


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag; outside absl.app.run (a
    # notebook, pytest, a plain script) flags are unparsed and that raises
    # UnparsedFlagAccessError in the worker. Marking them parsed keeps the
    # defaults and is what absl.app.run would have done.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in every grain worker process: exit as soon as the process that started it is gone.

    A trainer killed with SIGKILL (an OOM killer, `kill -9`, a preempted
    container) runs no cleanup, and grain's workers, blocked on a full queue,
    would live on (with the shared-memory resource tracker they keep open).
    A daemon thread polls the parent's pid: when the trainer dies the worker
    is re-parented and exits within a fraction of a second. Polling rather
    than PR_SET_PDEATHSIG: that signal follows the *thread* that started the
    worker (one of grain's pool threads), not the trainer process.
    """
    del worker_index, worker_count
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)  # no cleanup to run: the data it was producing has no reader
            threading.Event().wait(0.2)

    threading.Thread(target=watch, name="veclip-exit-with-parent", daemon=True).start()
