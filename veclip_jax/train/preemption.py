"""SIGTERM as a request to stop: save at the next step boundary, agreed by every process."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax

log = logging.getLogger(__name__)


class Preemption:
    """Whether this job has been asked to stop (SIGTERM), agreed by all processes at one step.

    A context manager: inside it, SIGTERM (a preempted TPU VM, a cluster's
    time limit) sets a flag that `reached(step)` reports. Further SIGTERMs are
    absorbed (a scheduler often repeats the signal): the context must cover
    the save until it is committed. Once a stop was requested, SIGTERM stays
    absorbed after the context too, so the process exits 0 after its save. With
    several processes, jax.distributed's preemption notifier owns SIGTERM and
    makes every process see the request at the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._own_handler = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> Preemption:
        if self._own_handler:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            log.warning("SIGTERM again: still saving; the process exits once the checkpoint is committed")
            return
        log.warning("SIGTERM received: saving a checkpoint after the current step")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (every process gets the same answer for the same step)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def __exit__(self, *exc: Any) -> None:
        if self._own_handler:
            # After a requested stop the process is on its way out: keep absorbing SIGTERM.
            signal.signal(signal.SIGTERM, self._handle if self.requested else self._previous)
