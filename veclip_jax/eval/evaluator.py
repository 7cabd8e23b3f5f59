"""The evaluations of `config.evals`, during training and standalone: one `Evaluator` runs them all.

Training builds it once (datasets indexed, class names and templates read:
a missing dataset stops the run before its first step) and calls it with the
train state's parameters at every entry's `every` and at the end; the
standalone `launch/eval.py` builds the same tasks for a loaded model. Results
are `{task: {metric: value}}`; `flatten` names them `task/metric` for
eval.jsonl and TensorBoard (e.g. `imagenet/acc1`, `coco/text_retrieval_recall@1`).

How each task scores (`Evaluator.scoring`, in the log and launch/eval.py's
report) follows the model's objective: token-wise late interaction for FILIP,
pooled embeddings for every other (veclip_jax/eval/tokenwise.py); the names
of the metrics are the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from veclip_jax.eval.tasks import EvalContext, Task, build_task
from veclip_jax.eval.tokenwise import DESCRIPTION

log = logging.getLogger(__name__)


def flatten(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"task/metric": v}."""
    return {f"{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}


class Evaluator:
    """Runs the tasks of a registry; `every` is the period of entries whose own `every` is 0."""

    def __init__(self, tasks: list[Task], every: int = 0):
        self.tasks, self.every = tasks, every

    @classmethod
    def from_entries(
        cls, entries: Mapping[str, Mapping[str, Any]], ctx: EvalContext, every: int = 0
    ) -> Evaluator:
        """Builds every entry's task; entries on the demo data are skipped (with a warning) off it."""
        tasks = []
        for name, entry in entries.items():
            if entry.get("dataset") == "demo" and not ctx.demo_files:
                log.warning("eval %s: on the demo data's held-out split, but this model's run is not on the "
                            "demo data: skipped", name)  # fmt: skip
                continue
            task = build_task(name, entry, ctx)
            how = DESCRIPTION[task.scoring]
            log.info("eval %s: %s %s, scored with %s", name, task.kind, task.dataset, how)
            tasks.append(task)
        return cls(tasks, every)

    @property
    def scoring(self) -> dict[str, str]:
        """task key -> how it scores: tokenwise.POOLED or TOKENWISE."""
        return {t.key: t.scoring for t in self.tasks}

    def period(self, task: Task) -> int:
        return task.entry["every"] or self.every

    def due_tasks(self, step: int | None, total: int | None) -> list[Task]:
        """The tasks due at `step` of a run of `total` steps (all at the end, or when step is None)."""
        if step is None or step == total:
            return list(self.tasks)
        return [t for t in self.tasks if self.period(t) and step % self.period(t) == 0]

    def due(self, step: int, total: int) -> bool:
        """Whether any task is due at `step`."""
        return bool(self.due_tasks(step, total))

    def run(
        self, params: Any, step: int | None = None, total: int | None = None
    ) -> dict[str, dict[str, float]]:
        """{task key: metrics} of the tasks due at `step` (all when `step` is None)."""
        results = {}
        caches = {id(t.ctx): t.ctx.cache for t in self.tasks}
        try:
            for task in self.due_tasks(step, total):
                t0 = time.perf_counter()
                results[task.key] = task.run(params)
                rate = task.images_per_sec
                log.info("eval %s: %.1f s, %s, %s scoring", task.name, time.perf_counter() - t0,
                         f"{rate:.0f} images/s embedding" if rate == rate else "images shared",
                         task.scoring)  # fmt: skip
        finally:
            for cache in caches.values():  # embeddings of these parameters only
                cache.clear()
        return results

    def __call__(self, params: Any, step: int | None = None, total: int | None = None) -> dict[str, float]:
        """`run`, flattened to {"task/metric": value}."""
        return flatten(self.run(params, step, total))
