"""Running a conversion (data/convert.py): tasks over machines, worker processes, resume, the summary.

Resume. A shard is done when its file exists (RecordWriter renames it into
place only on a clean close) and so does its stats file, written right after,
recording the inputs and options it was made from. A rerun skips done shards
and rewrites the others (a leftover PATH.tmp is overwritten). A done shard
made from other inputs or options stops the run before anything is written:
mixing two conversions in one directory would silently duplicate or drop pairs.

The summary (records per shard, skips by reason, VeCap join rate) is
returned, and written as JSON to OUT.stats.json next to the shards.

One converter per output. A conversion holds OUT.lock (`OutputLock`) while it
runs: a second converter on the same output (the same command started twice,
two machines given the same --task_index) is refused, naming the holder,
instead of both writing the same PATH.tmp. Under the lock, this conversion's
temporary files are its own: those a killed converter left are removed at the
start, and those of a failed run (a full disk) when it fails.

On a Ray cluster (`ray_address`, `--ray_address`). The pending shards become
Ray tasks (one CPU each) instead of worker processes; this process (the
driver) keeps everything else: the lock, the resume rule, the VeCap index,
the summary. A task runs the same `write_shard` on the same Job, so the
shards are byte for byte those of a local run. The workers read the inputs
and write OUT-* where the driver names them: OUT (and the inputs) must be on
a file system every node mounts at the same path (NFS, Lustre, a GCS/S3 FUSE
mount); a task that does not see the driver's lock file refuses to write
rather than fill a node-local disk. A failing shard stops the run like a
failing worker process: no new shard starts, the shards under way are
cancelled, and its own exception (not Ray's wrapper) reaches the caller.

Over 520 lines: one conversion's life (lock, resume, processes or Ray tasks,
summary) reads best in one place; the shard itself is in convert_shard.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import fcntl
import glob
import json
import logging
import multiprocessing
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from veclip_jax import fileio
from veclip_jax.data import records
from veclip_jax.data.convert_shard import Job, shard_keys_path, write_shard
from veclip_jax.data.readers.vecap_json import build_vecap_index
from veclip_jax.data.skips import CONVERTER_REASONS, REASONS
from veclip_jax.errors import UserError

log = logging.getLogger(__name__)


class ConversionError(UserError, ValueError):
    """A conversion that cannot run as asked (bad options, inputs, an output made otherwise): exit 2."""


class ConversionBusyError(UserError):
    """Another live converter is writing the same output: exit 2, naming it."""


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
        raise ConversionError(
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


def lock_path(out: str, task: tuple[int, int] = (0, 1)) -> str:
    """The output's lock (task i of M > 1 also holds OUT.task-0000i-of-0000M.lock)."""
    return f"{out}.lock" if task == (0, 1) else f"{out}.task-{task[0]:05d}-of-{task[1]:05d}.lock"


def _open_lock(path: str) -> int:
    """Opens (creating) a lock file, refusing anything but a plain file of its own.

    The holder is written into it, so a symlink planted there must not redirect
    that write: O_NOFOLLOW refuses one (a dangling one is not followed to create
    its target); a FIFO, device or hard link is refused before a byte is written.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    refuse = f"{path} is not a plain lock file ({{}}): remove it, or convert into another --out"
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConversionError(refuse.format("a symlink")) from None
        raise ConversionError(f"{path}: cannot open the output's lock ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "a hard link" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise ConversionError(refuse.format(what))
    return fd


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _read_holder(path: str) -> str:
    """The holder a lock file names; "" for anything but a plain file (a FIFO must not block us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return _holder(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    finally:
        os.close(fd)


class OutputLock:
    """The output's lock: `fcntl.flock` on OUT.lock, released by the kernel when the holder dies.

    A single conversion (task 0 of 1) holds OUT.lock exclusively. Task i of M
    (machines sharing one conversion) holds OUT.lock shared, so the other tasks
    may run, and OUT.task-0000i-of-0000M.lock exclusively, so the same task may
    not run twice. The exclusive file records the holder (host, pid, task) for
    the message a refused converter prints. On a file system without flock
    (some network mounts) the lock is skipped with a warning.
    """

    def __init__(self, out: str, task: tuple[int, int] = (0, 1)):
        self.out, self.task = out, task
        self._fds: list[int] = []
        self._own: int | None = None  # the file naming this holder, once the lock is taken

    def acquire(self) -> OutputLock:
        """Takes the lock, or raises ConversionBusyError naming the live holder."""
        single = self.task == (0, 1)
        main = _open_lock(lock_path(self.out))
        self._fds.append(main)
        try:
            fcntl.flock(main, (fcntl.LOCK_EX if single else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            held = [_holder(main)] if _holder(main) else []
            for path in sorted(glob.glob(glob.escape(self.out) + ".task-*-of-*.lock")):
                held += [h for h in [_read_holder(path)] if h]  # the tasks holding it shared
            self.release()
            raise ConversionBusyError(self._busy(", ".join(held) or "unknown")) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: no flock on this file system
            log.warning("%s: cannot lock (%s): make sure no other converter writes this output",
                        lock_path(self.out), e.strerror)  # fmt: skip
            return self
        own = main
        if not single:
            own = _open_lock(lock_path(self.out, self.task))
            self._fds.append(own)
            try:
                fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(own) or "unknown"
                self.release()
                raise ConversionBusyError(self._busy(holder)) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "task": list(self.task),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        os.ftruncate(own, 0)
        os.pwrite(own, json.dumps(info).encode(), 0)
        self._own = own
        return self

    def _busy(self, holder: str) -> str:
        return (f"{self.out} is being converted by another converter ({holder}): wait for it to "
                "finish, stop it, or convert into another --out")  # fmt: skip

    def release(self) -> None:
        """Drops the lock. The files stay: removing one could let two converters lock two files."""
        for fd in reversed(self._fds):
            try:
                if fd == self._own:  # never after a refused acquire: the file names the live holder
                    os.ftruncate(fd, 0)  # no holder named any more
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(fd)
        self._fds, self._own = [], None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _temporaries(jobs: list[Job], mine: list[int], out: str, task: tuple[int, int]) -> list[str]:
    """This task's temporary files present now, by exact name: only what this conversion writes.

    RecordWriter's PATH.tmp of each of its shards, the VeCap index's INDEX.tmp, and fileio's
    NAME.tmpPID of its stats, key and summary files. Another task's files are never named.
    """
    found = [p for p in [jobs[i].path + ".tmp" for i in mine] + [_vecap_index_path(out, task) + ".tmp"]
             if os.path.lexists(p)]  # fmt: skip
    names = {stats_path(out, task)}
    for i in mine:
        names |= {jobs[i].stats_path, shard_keys_path(jobs[i].stats_path)}
    for directory in {os.path.dirname(n) for n in names}:
        try:
            entries = os.listdir(directory)
        except FileNotFoundError:
            continue
        for entry in entries:
            base, sep, pid = os.path.join(directory, entry).rpartition(".tmp")
            if sep and pid.isdigit() and base in names:
                found.append(os.path.join(directory, entry))
    return found


def _remove(paths: list[str]) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def run_conversion(
    jobs: list[Job],
    out: str,
    *,
    vecap_json: list[str],
    workers: int,
    task: tuple[int, int] = (0, 1),
    ray_address: str | None = None,
) -> ConversionSummary:
    """Writes this task's pending shards (holding the output's lock), then the summary; returns it.

    `ray_address`: write the shards as tasks on that Ray cluster (see `ray_connect`); `workers` is
    then the most shards in flight at once (0: as many as the cluster runs).
    """
    os.makedirs(os.path.dirname(shard_stats_path(out, 0, 1)), exist_ok=True)
    task_index, num_tasks = task
    # Task i of M (one per machine) writes the output shards j with j % M == i: shards depend only
    # on their own inputs, so the machines need no coordination beyond a shared output directory.
    mine = [i for i in range(len(jobs)) if i % num_tasks == task_index]
    with OutputLock(out, task):
        stale = _temporaries(jobs, mine, out, task)
        if stale:  # under the lock: no live converter is writing them
            log.info("removing %d temporary files of an earlier converter that stopped: %s%s",
                     len(stale), stale[0], ", ..." if len(stale) > 1 else "")  # fmt: skip
            _remove(stale)
        try:
            return _run_locked(
                jobs, out, mine, vecap_json=vecap_json, workers=workers, task=task, ray_address=ray_address
            )
        except BaseException:
            _remove(_temporaries(jobs, mine, out, task))  # a full disk must not leave PATH.tmp behind
            raise


def _run_locked(
    jobs: list[Job],
    out: str,
    mine: list[int],
    *,
    vecap_json: list[str],
    workers: int,
    task: tuple[int, int],
    ray_address: str | None = None,
) -> ConversionSummary:
    t0 = time.perf_counter()
    num_shards = len(jobs)
    num_tasks = task[1]
    done = {i: s for i in mine if (s := _load_done(jobs[i])) is not None}
    pending = [jobs[i] for i in mine if i not in done]
    log.info("%d of %d shards to write (%d done before)", len(pending), len(mine), len(done))
    index_path = _vecap_index_path(out, task)
    if pending and vecap_json:
        try:
            build_vecap_index(vecap_json, index_path)
        except ValueError as e:  # a truncated or malformed VeCap JSON, named by the reader
            raise ConversionError(str(e)) from None
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

    if ray_address is not None:
        if pending:
            _run_on_ray(pending, out, ray_address, workers, finished)
    elif (workers := max(1, min(workers, len(pending)))) == 1:
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


def ray_connect(address: str) -> bool:
    """Connects this process to Ray; True when it started the connection (so it shuts it down after).

    "local": a Ray on this machine only, started here (nothing to start before); "auto": the
    cluster this machine joined with `ray start`; HOST:PORT: that cluster's head;
    ray://HOST:10001: through Ray Client. A process already connected (a caller's own
    `ray.init`, a test's) keeps its connection, whatever the address.
    """
    import ray  # here: Ray starts nothing and costs nothing unless asked for

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False if address == "local" else None,
                 logging_level=logging.WARNING)  # fmt: skip
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConversionError(
            f"--ray_address={address}: cannot connect to Ray ({str(e).splitlines()[0]}); use "
            "local, auto (after `ray start` on this machine), HOST:PORT or ray://HOST:10001"
        ) from None
    return True


def _write_shard_on_node(job: Job, lock: str, holder: str) -> dict[str, Any]:
    """`write_shard` in a Ray worker, once it has seen the driver's lock: OUT is shared with the driver."""
    if holder and _read_holder(lock) != holder:
        raise ConversionError(
            f"{socket.gethostname()} does not see {lock} as the converter left it: the output must "
            "be on a file system every node of the Ray cluster mounts at the same path"
        )
    return write_shard(job)


def _run_on_ray(
    pending: list[Job], out: str, address: str, workers: int, finished: Callable[[dict[str, Any]], None]
) -> None:
    """Writes the pending shards as Ray tasks (one CPU each), `workers` at most in flight (0: all)."""
    import ray

    started = ray_connect(address)
    try:
        # num_cpus=1: a shard is one thread of decode checks; a fraction would oversubscribe the
        # cores. Retries (node lost) are safe: write_shard rewrites PATH.tmp from the start.
        task = ray.remote(num_cpus=1)(_write_shard_on_node)
        lock = lock_path(out)
        holder = _read_holder(lock)
        window = workers if workers > 0 else len(pending)
        queue, running = list(pending), {}
        cpus = ray.cluster_resources().get("CPU", 0)
        log.info("Ray: %d shards as tasks on a cluster of %g CPUs", len(pending), cpus)
        try:
            while queue or running:
                while queue and len(running) < window:
                    job = queue.pop(0)
                    running[task.remote(job, lock, holder)] = job
                (ref,), _ = ray.wait(list(running), num_returns=1)
                del running[ref]
                finished(_ray_result(ray, ref))
        except BaseException:
            for ref in running:  # no new shard starts; those under way stop (a rerun redoes them)
                ray.cancel(ref)
            for ref in running:  # settled before the caller removes their temporary files
                try:
                    ray.get(ref)
                except Exception:  # noqa: S110 (cancelled or failed too: the first error is raised)
                    pass
            raise
    finally:
        if started:
            ray.shutdown()


def _ray_result(ray: Any, ref: Any) -> dict[str, Any]:
    """A task's stats, or the shard's own exception: Ray's wrapper carries the remote traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


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
