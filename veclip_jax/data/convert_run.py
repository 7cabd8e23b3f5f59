"""Running a conversion (data/convert.py): tasks over machines, worker processes, resume, the summary.

Resume. A shard is done when its file exists (RecordWriter renames it into
place only on a clean close) and so does its stats file, written right after,
recording the inputs and options it was made from. A rerun skips done shards
and rewrites the others (a leftover PATH.tmp is overwritten). A done shard
made from other inputs or options stops the run before anything is written:
mixing two conversions in one directory would silently duplicate or drop pairs.

The summary (records per shard, skips by reason, VeCap join rate) is
returned, and written as JSON to OUT.stats.json next to the shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import time
from typing import Any

import numpy as np

from veclip_jax import fileio
from veclip_jax.data import records
from veclip_jax.data.convert_shard import Job, shard_keys_path, write_shard
from veclip_jax.data.readers.vecap_json import build_vecap_index
from veclip_jax.data.skips import CONVERTER_REASONS, REASONS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ConversionSummary:
    """The outcome of a conversion: totals, and per-shard stats (`shards`, in shard order)."""

    out: str
    num_shards: int
    records: int
    with_alt_text: int
    with_vecap_text: int
    vecap_joined: int
    vecap_join_rate: float | None  # vecap_joined / records; None without VeCap JSON
    skipped: dict[str, int]
    written: int  # shards written by this run
    reused: int  # shards found done and skipped
    missing_inputs: list[str]
    unreadable_inputs: list[str]
    seconds: float
    stats_path: str
    shards: list[dict[str, Any]]  # this task's shards (all of them when task == [0, 1])
    task: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  # [index, count] of --task
    duplicate_keys_across_shards: int = 0  # keys in more than one shard (of the shards done so far)
    duplicate_key_shards: list[list[str]] = dataclasses.field(default_factory=list)  # a few shard pairs

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what OUT.stats.json holds)."""
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A human-readable report."""
        lines = [
            f"{self.records:,} records in {self.num_shards} shards {self.out}-*-of-{self.num_shards:05d}"
            f"{records.SHARD_SUFFIX} ({self.written} written now, {self.reused} done before) "
            f"in {self.seconds:.1f} s",
            f"  with AltText {self.with_alt_text:,}, with VeCap {self.with_vecap_text:,}",
        ]
        if self.vecap_join_rate is not None:
            lines.append(
                f"  VeCap joined by URL: {self.vecap_joined:,} of {self.records:,} "
                f"({100 * self.vecap_join_rate:.1f} %)"
            )
        total = sum(self.skipped.values())
        lines.append(f"  skipped {total:,}" + (":" if total else ""))
        for reason, n in self.skipped.items():
            lines.append(f"    {reason:<17} {n:>10,}  {REASONS[reason]}")
        for name, paths in (("missing", self.missing_inputs), ("unreadable", self.unreadable_inputs)):
            if paths:
                shown = ", ".join(paths[:5]) + (f", ... ({len(paths)} in all)" if len(paths) > 5 else "")
                lines.append(f"  {name} input tars: {shown}")
        per_shard = [s["records"] for s in self.shards]
        if per_shard:
            lines.append(f"  records per shard: min {min(per_shard):,}, max {max(per_shard):,}")
        if self.duplicate_keys_across_shards:
            shown = ", ".join(" and ".join(p) for p in self.duplicate_key_shards[:3])
            n = self.duplicate_keys_across_shards
            lines.append(f"  keys in more than one shard: {n:,} (e.g. {shown})")
        if self.task != [0, 1]:
            lines.append(f"  task {self.task[0]} of {self.task[1]}: its {len(self.shards)} shards above")
        lines.append(f"  stats: {self.stats_path}")
        return "\n".join(lines)


# Side outputs are named OUT.something, never OUT-something: the shards' own glob (OUT-*) must
# match the shards only, so `--config.data.train_files='DIR/train-*'` reads them and nothing else.


def stats_path(out: str, task: tuple[int, int] = (0, 1)) -> str:
    """A conversion's summary: OUT.stats.json (task i of M: OUT.stats-0000i-of-0000M.json)."""
    return f"{out}.stats.json" if task == (0, 1) else f"{out}.stats-{task[0]:05d}-of-{task[1]:05d}.json"


def shard_stats_path(out: str, index: int, num_shards: int) -> str:
    """Where shard `index` of a conversion records its stats (and so that it is done)."""
    return os.path.join(f"{out}.shard-stats", f"{index:05d}-of-{num_shards:05d}.json")


def _vecap_index_path(out: str, task: tuple[int, int] = (0, 1)) -> str:
    return f"{out}.vecap-index.sqlite" if task == (0, 1) else f"{out}.vecap-index-{task[0]:05d}.sqlite"


def _load_done(job: Job) -> dict[str, Any] | None:
    """The stats of a done shard; None if it must be (re)written; raises if made from other inputs."""
    if not (os.path.exists(job.path) and os.path.exists(job.stats_path)):
        return None
    try:
        with open(job.stats_path) as f:
            stats = json.load(f)
    except ValueError:
        return None  # not readable stats: remake the shard
    if stats.get("fingerprint") != job.fingerprint:
        old = stats.get("fingerprint") or {}
        differ = sorted(k for k in set(old) | set(job.fingerprint) if old.get(k) != job.fingerprint.get(k))
        raise ValueError(
            f"{job.path} exists from a conversion with other inputs or options (differs in: "
            f"{', '.join(differ)}). Convert into a new --out, or delete that conversion's shards and "
            f"{os.path.dirname(job.stats_path)}/ first."
        )
    return stats


def _cross_shard_duplicates(jobs: list[Job]) -> tuple[int, list[list[str]]]:
    """(keys found in more than one shard, up to 10 [shard, shard] pairs holding one) over the shards done."""
    hashes, owner = [], []
    for i, job in enumerate(jobs):
        path = shard_keys_path(job.stats_path)
        if os.path.exists(path):
            h = np.load(path)
            hashes.append(h)
            owner.append(np.full(len(h), i, np.int64))
    if not hashes:
        return 0, []
    h, o = np.concatenate(hashes), np.concatenate(owner)
    order = np.argsort(h, kind="stable")
    h, o = h[order], o[order]
    repeat = np.flatnonzero(h[1:] == h[:-1])  # within a shard keys are unique: a repeat spans shards
    pairs = []
    for r in repeat[:10]:
        pairs.append([os.path.basename(jobs[o[r]].path), os.path.basename(jobs[o[r + 1]].path)])
    return len(np.unique(h[repeat + 1])) if len(repeat) else 0, pairs


def run_conversion(
    jobs: list[Job],
    out: str,
    *,
    vecap_json: list[str],
    workers: int,
    task: tuple[int, int] = (0, 1),
) -> ConversionSummary:
    t0 = time.perf_counter()
    num_shards = len(jobs)
    task_index, num_tasks = task
    os.makedirs(os.path.dirname(shard_stats_path(out, 0, 1)), exist_ok=True)
    # Task i of M (one per machine) writes the output shards j with j % M == i: shards depend only
    # on their own inputs, so the machines need no coordination beyond a shared output directory.
    mine = [i for i in range(num_shards) if i % num_tasks == task_index]
    done = {i: s for i in mine if (s := _load_done(jobs[i])) is not None}
    pending = [jobs[i] for i in mine if i not in done]
    log.info("%d of %d shards to write (%d done before)", len(pending), len(mine), len(done))
    index_path = _vecap_index_path(out, task)
    if pending and vecap_json:
        build_vecap_index(vecap_json, index_path)
        pending = [dataclasses.replace(job, vecap_index=index_path) for job in pending]

    results: dict[str, dict[str, Any]] = {}

    def finished(stats: dict[str, Any]) -> None:
        results[stats["shard"]] = stats
        log.info(
            "[%d/%d] %s: %d records, %d skipped (%.1f s)",
            len(results),
            len(pending),
            stats["shard"],
            stats["records"],
            sum(stats["skipped"].values()),
            stats["seconds"],
        )

    workers = max(1, min(workers, len(pending)))
    if workers == 1:
        for job in pending:  # in this process: no start-up cost, plain tracebacks
            finished(write_shard(job))
    else:
        # spawn, not fork: the caller may hold threads (jax, grain) that a fork would copy mid-lock.
        # A process pool from concurrent.futures rather than multiprocessing.Pool: a worker that dies
        # (killed for memory, or unable to start) raises BrokenProcessPool instead of hanging the run.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(write_shard, job) for job in pending]
            try:
                for future in concurrent.futures.as_completed(futures):
                    finished(future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # shards under way finish; no new ones start
                raise
    if os.path.exists(index_path):
        os.remove(index_path)  # every shard of this task is done: the index is only needed to resume

    stats = {i: done.get(i) or results[os.path.basename(jobs[i].path)] for i in mine}
    summary = _summary(jobs, stats, out, vecap_json, reused=set(done), t0=t0, task=task)
    fileio.atomic_write_json(summary.stats_path, summary.to_dict(), indent=1)
    if num_tasks > 1:  # the task that finds every shard done also writes the whole conversion's summary
        everything = {i: s for i, job in enumerate(jobs) if (s := _load_done(job)) is not None}
        if len(everything) == num_shards:
            before = set(everything) - {i for i in mine if i not in done}  # shards not written by this task
            whole = _summary(jobs, everything, out, vecap_json, reused=before, t0=t0, task=(0, 1))
            fileio.atomic_write_json(whole.stats_path, whole.to_dict(), indent=1)
            log.info("all %d shards of %s are done: %s", num_shards, out, whole.stats_path)
    return summary


def _summary(
    jobs: list[Job],
    stats: dict[int, dict[str, Any]],
    out: str,
    vecap_json: list[str],
    *,
    reused: set[int],
    t0: float,
    task: tuple[int, int],
) -> ConversionSummary:
    shards = []
    for i in sorted(stats):
        s = stats[i]
        shards.append({k: v for k, v in s.items() if k != "fingerprint"} | {"reused": i in reused})
    skipped = collections.Counter()
    for s in shards:
        skipped.update(s["skipped"])
    total = sum(s["records"] for s in shards)
    joined = sum(s["vecap_joined"] for s in shards)
    duplicates, pairs = _cross_shard_duplicates(jobs)
    if duplicates:
        log.warning(
            "%d keys appear in more than one shard (e.g. %s): the same pair may be in two input tars",
            duplicates,
            ", ".join(" and ".join(p) for p in pairs[:3]),
        )
    return ConversionSummary(
        out=out,
        num_shards=len(jobs),
        records=total,
        with_alt_text=sum(s["with_alt_text"] for s in shards),
        with_vecap_text=sum(s["with_vecap_text"] for s in shards),
        vecap_joined=joined,
        vecap_join_rate=(joined / total if total else 0.0) if vecap_json else None,
        skipped={r: skipped[r] for r in CONVERTER_REASONS if skipped[r]},
        written=len(shards) - len(reused & set(stats)),
        reused=len(reused & set(stats)),
        missing_inputs=[p for s in shards for p in s["missing_inputs"]],
        unreadable_inputs=[p for s in shards for p in s["unreadable_inputs"]],
        seconds=round(time.perf_counter() - t0, 3),
        stats_path=stats_path(out, task),
        shards=shards,
        task=list(task),
        duplicate_keys_across_shards=duplicates,
        duplicate_key_shards=pairs,
    )
