"""The VeCap caption pipeline on Ray Data: input shards -> visual captions -> check -> fusion -> JSON.

The unit of work is an input shard, planned as the converter plans its output shards
(data/convert.py): shard j of N holds the input files i with i % N == j (img2dataset tars, Parquet
files; by default N = the number of files, one per input file), or the rows r with r % N == j
(CSV/TSV tables, ImageFolder trees). Shard j writes

  OUT-0000j-of-0000N.json                 {image_url: VeCap caption} (the sample's key when it has no
                                          URL): VeCLIP's released format, what --vecap_json joins
  OUT-0000j-of-0000N.provenance.parquet   one row per captioned image: key, url, AltText and its
                                          class, visual caption, check, VeCap caption (null when
                                          dropped), drop reason, models, prompt hashes, settings

and the run writes OUT.vecap_stats.json (the summary) and holds OUT.vecap.lock. Side files never
match OUT-*.json, so `--vecap_json='OUT-*.json'` reads the captions and nothing else.

The Ray Data plan (one machine by default, a cluster with --ray_address):

  pending shards --read (tasks)--> mini-batches --Captioner pool--> --Check+Fuse pool--> driver

* read: a Ray task per shard reads it with the converter's readers (readers/), skips what the
  converter would skip (reasons of data/skips.py, images the training pipeline cannot decode,
  a URL or key seen before in the shard) and cuts the rest into mini-batches of --batch_size
  images. A mini-batch is one Ray Data row: every model sees the same batches on every run,
  so greedy captions are reproducible even where batched numbers depend on the batch.
* caption and check+fuse: actor pools (a model loads once per actor) of --concurrency actors
  with --num_gpus each (a fraction of a CPU each without GPUs, so read tasks keep running).
* the driver collects the mini-batches of each shard and, once the last one is in, writes the
  shard: Parquet, then JSON, each to a temporary file renamed into place. The JSON is the done
  marker: a rerun skips shards whose JSON and Parquet exist (and refuses ones made with other
  models, prompts or settings), so a killed run loses only the shards in flight.

On a cluster the read tasks and the actors run on any node, so the inputs and the model
directories must be at the same path on every node (a shared file system, or copies); the outputs
are written by the driver alone, on its machine.

Progress (images per second per stage, ETA) is printed while it runs; every skip and every dropped
caption is counted by reason in the summary.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import logging
import os
import pickle
import re
import sys
import threading
import time
from typing import Any

from veclip_jax import fileio
from veclip_jax.data.convert_run import ConversionBusyError, OutputLock
from veclip_jax.errors import UserError
from veclip_jax.vecap import checks
from veclip_jax.vecap.generate import preflight
from veclip_jax.vecap.options import PIPELINE_VERSION, CaptionOptions, Resources, VecapError
from veclip_jax.vecap.progress import Progress, progress_line
from veclip_jax.vecap.shards import (
    SKIP_REASONS,
    Inputs,
    Shard,
    json_path,
    parquet_path,
    plan_shards,
    read_batches,
    stats_path,
)
from veclip_jax.vecap.stages import DROP_REASONS, CaptionStage, TextStage

log = logging.getLogger(__name__)


def fingerprint(shard: Shard, options: CaptionOptions, batch_size: int) -> dict[str, Any]:
    return {
        "pipeline": PIPELINE_VERSION,
        "kind": shard.kind,
        "inputs": list(shard.inputs_fingerprint),
        "shard": [shard.index, shard.count],
        "batch_size": batch_size,  # batches are deterministic per batch size (module docstring)
        **options.provenance(),
    }


# --- the driver: write a shard once all its batches are in ------------------------------------


def _write_shard(
    out: str,
    shard: Shard,
    batches: list[dict[str, Any]],
    options: CaptionOptions,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches = sorted(batches, key=lambda b: b["batch"])
    skipped: collections.Counter[str] = collections.Counter()
    dropped: collections.Counter[str] = collections.Counter()
    classes: collections.Counter[str] = collections.Counter()
    table: dict[str, list] = collections.defaultdict(list)
    result: dict[str, str] = {}
    engine = "{}"
    for b in batches:
        skipped.update(json.loads(b["skipped"]))
        engine = b.get("engine") or engine
        for i in range(len(b["keys"])):
            reason = b["drop"][i]
            if reason == "undecodable_image":  # the captioner's decoder refused what the check let by
                skipped[reason] += 1
                continue
            if reason:
                dropped[reason] += 1
            else:
                result[b["urls"][i] or b["keys"][i]] = b["vecap"][i]
            classes[b["alt_class"][i]] += 1
            for col, key in (
                ("key", "keys"),
                ("url", "urls"),
                ("alt_text", "alts"),
                ("alt_class", "alt_class"),
                ("visual_caption", "visual"),
                ("safe", "safe"),
                ("vecap_caption", "vecap"),
                ("drop_reason", "drop"),
                ("visual_tokens", "visual_tokens"),
                ("vecap_tokens", "vecap_tokens"),
            ):
                table[col].append(b[key][i])
    prov = options.provenance()
    rows = len(table["key"])
    settings = {k: prov[k] for k in ("max_new_tokens", "fusion_max_new_tokens", "max_words", "do_sample")}
    settings = json.dumps(settings | json.loads(engine), sort_keys=True)
    for col in (
        "captioner",
        "checker",
        "fuser",
        "caption_prompt_hash",
        "check_prompt_hash",
        "fusion_prompt_hash",
    ):
        table[col] = [prov[col]] * rows
    table["generation"] = [settings] * rows
    stats = {
        "shard": os.path.basename(json_path(out, shard)),
        "captions": len(result),
        "captioned": rows,
        "skipped": {r: skipped[r] for r in SKIP_REASONS if skipped[r]},
        "dropped": {r: dropped[r] for r in DROP_REASONS if dropped[r]},
        "alt_text_classes": {c: classes[c] for c in checks.ALT_CLASSES if classes[c]},
        "visual_tokens": sum(table["visual_tokens"]),
        "vecap_tokens": sum(table["vecap_tokens"]),
    }
    schema = pa.schema(
        [(c, pa.string()) for c in ("key", "url", "alt_text", "alt_class", "visual_caption")]
        + [
            ("safe", pa.bool_()),
            ("vecap_caption", pa.string()),
            ("drop_reason", pa.string()),
            ("visual_tokens", pa.int32()),
            ("vecap_tokens", pa.int32()),
        ]
        + [
            (c, pa.string())
            for c in (
                "captioner",
                "checker",
                "fuser",
                "caption_prompt_hash",
                "check_prompt_hash",
                "fusion_prompt_hash",
                "generation",
            )
        ]
    )
    schema = schema.with_metadata(
        {
            "vecap_fingerprint": json.dumps(fingerprint, sort_keys=True),
            "vecap_stats": json.dumps(stats, sort_keys=True),
        }
    )
    buf = io.BytesIO()
    pq.write_table(pa.table({f.name: table[f.name] for f in schema}, schema=schema), buf)
    fileio.atomic_write_bytes(parquet_path(out, shard), buf.getvalue())
    # Last: the JSON is the done marker. One object per file, VeCLIP's released format.
    fileio.atomic_write_bytes(json_path(out, shard), json.dumps(result, ensure_ascii=False).encode("utf-8"))
    return stats


def _done_stats(out: str, shard: Shard, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A finished shard's stats; None if it must be made; raises if it was made with other settings."""
    import pyarrow.parquet as pq

    jpath, ppath = json_path(out, shard), parquet_path(out, shard)
    if not (os.path.exists(jpath) and os.path.exists(ppath)):
        return None
    try:
        meta = pq.read_schema(ppath).metadata or {}
        old = json.loads(meta[b"vecap_fingerprint"])
        stats = json.loads(meta[b"vecap_stats"])
    except (OSError, ValueError, KeyError):
        return None  # a damaged side table: remake the shard
    if old != fingerprint:
        differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        raise VecapError(
            f"{jpath} was made with other inputs, models, prompts or settings (differs in: "
            f"{', '.join(differ)}): write into another --out, or delete that run's OUT-* files first"
        )
    return stats


# --- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass
class VecapSummary:
    """The outcome of a caption run: totals and per-shard stats (written to OUT.vecap_stats.json)."""

    out: str
    num_shards: int
    captions: int
    captioned: int
    skipped: dict[str, int]
    dropped: dict[str, int]
    alt_text_classes: dict[str, int]
    written: int
    reused: int
    seconds: float
    provenance: dict[str, Any]
    stats_path: str
    shards: list[dict[str, Any]]

    def format(self) -> str:
        """A human-readable report."""
        lines = [
            f"{self.captions:,} VeCap captions of {self.captioned:,} captioned images in {self.num_shards} "
            f"shards {self.out}-*-of-{self.num_shards:05d}.json ({self.written} written now, {self.reused} "
            f"done before) in {self.seconds:.1f} s",
            "  AltText classes: " + ", ".join(f"{k} {v:,}" for k, v in self.alt_text_classes.items()),
        ]
        for what, counts in (("skipped images", self.skipped), ("dropped captions", self.dropped)):
            lines.append(f"  {what} {sum(counts.values()):,}" + (":" if counts else ""))
            lines += [f"    {r:<20} {n:>10,}" for r, n in counts.items()]
        lines.append(f"  stats: {self.stats_path}")
        return "\n".join(lines)


def _summary(
    out: str,
    shards: list[Shard],
    stats: dict[int, dict],
    reused: set[int],
    t0: float,
    options: CaptionOptions,
) -> VecapSummary:
    total: dict[str, collections.Counter] = {
        k: collections.Counter() for k in ("skipped", "dropped", "classes")
    }
    for s in stats.values():
        total["skipped"].update(s["skipped"])
        total["dropped"].update(s["dropped"])
        total["classes"].update(s["alt_text_classes"])
    return VecapSummary(
        out=out,
        num_shards=len(shards),
        captions=sum(s["captions"] for s in stats.values()),
        captioned=sum(s["captioned"] for s in stats.values()),
        skipped={r: total["skipped"][r] for r in SKIP_REASONS if total["skipped"][r]},
        dropped={r: total["dropped"][r] for r in DROP_REASONS if total["dropped"][r]},
        alt_text_classes={c: total["classes"][c] for c in checks.ALT_CLASSES if total["classes"][c]},
        written=len(stats) - len(reused),
        reused=len(reused),
        seconds=round(time.perf_counter() - t0, 3),
        provenance=options.provenance()
        | {
            "caption_prompt": options.caption_prompt,
            "check_prompt": options.check_prompt if options.check else None,
            "fusion_prompt": options.fusion_prompt,
        },
        stats_path=stats_path(out),
        shards=[stats[i] | {"reused": i in reused} for i in sorted(stats)],
    )


def _stale_temporaries(out: str) -> list[str]:
    pattern = glob.escape(out) + "-*-of-*"
    return [
        p
        for p in glob.glob(pattern + ".json.tmp*") + glob.glob(pattern + ".provenance.parquet.tmp*")
        if p.rpartition(".tmp")[2].isdigit()
    ]


def init_ray(address: str | None) -> bool:
    """Connects to Ray; True when this call started the connection (the caller shuts it down).

    None or "local": a Ray on this machine only, started here; "auto": the cluster this machine
    joined with `ray start`; HOST:PORT: that cluster's head; ray://HOST:10001: Ray Client. A
    process already connected (a test's own `ray.init`) keeps its connection.
    """
    import ray

    if ray.is_initialized():
        return False
    local = address in (None, "local")
    try:
        # log_to_driver off: the workers' library chatter (and a shared machine's) stays in Ray's
        # logs; errors still come back as exceptions, and progress is printed here.
        ray.init(
            address=None if local else address,
            include_dashboard=False if local else None,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise VecapError(
            f"--ray_address={address}: cannot connect to Ray ({str(e).splitlines()[0]}); use local, auto "
            "(after `ray start` here), HOST:PORT or ray://HOST:10001. Ray 2.60 clusters check a token: "
            "with an explicit address set RAY_AUTH_MODE=token and copy the head's ~/.ray/auth_token here"
        ) from None
    return True


def _user_error(e: BaseException) -> UserError | None:
    """The UserError (a model that does not load) behind a Ray task or actor failure, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        # An actor that died in its constructor carries the error as text only.
        found = re.search(r"veclip_jax\.\S*(?:ModelError|VecapError): (.*)", str(e))
        if found:
            return VecapError(found.group(1))
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else e.__cause__
    return None


def make_vecap(
    inputs: Inputs,
    out: str,
    options: CaptionOptions,
    resources: Resources = Resources(),  # noqa: B008 (frozen)
    *,
    num_shards: int = 0,
    progress_every: float = 10.0,
) -> VecapSummary:
    """Writes the VeCap captions of every pending input shard; returns the summary (see the module doc)."""
    t0 = time.perf_counter()
    if not out:
        raise VecapError("an output prefix is needed, e.g. /data/vecap/captions")
    out = os.path.abspath(os.path.expanduser(out))
    options = options.validate()
    if resources.batch_size < 1 or resources.concurrency < 1 or resources.num_gpus < 0:
        raise VecapError("--batch_size and --concurrency must be >= 1, --num_gpus >= 0")
    shards = plan_shards(inputs, num_shards)
    texts = [("--fuser", options.fuser)] + (
        [("--checker", options.checker)] if options.check and options.checker else []
    )
    preflight(options.captioner, texts)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fingerprints = {s.index: fingerprint(s, options, resources.batch_size) for s in shards}
    try:
        lock = OutputLock(out + ".vecap").acquire()  # OUT.vecap.lock
    except ConversionBusyError as e:
        holder = str(e).partition("(")[2].rpartition(")")[0]
        raise VecapError(
            f"{out} is being captioned by another run ({holder}): wait for it, stop it, or "
            "write into another --out"
        ) from None
    try:
        for p in _stale_temporaries(out):  # under the lock: a killed run's, no live run's
            os.remove(p)
        done = {s.index: st for s in shards if (st := _done_stats(out, s, fingerprints[s.index])) is not None}
        pending = [s for s in shards if s.index not in done]
        log.info("%d of %d shards to caption (%d done before)", len(pending), len(shards), len(done))
        written = _run(pending, out, options, resources, fingerprints, progress_every) if pending else {}
        summary = _summary(out, shards, done | written, set(done), t0, options)
        fileio.atomic_write_json(summary.stats_path, dataclasses.asdict(summary), indent=1)
        return summary
    finally:
        lock.release()


def _run(
    pending: list[Shard],
    out: str,
    options: CaptionOptions,
    resources: Resources,
    fingerprints: dict[int, dict],
    progress_every: float,
) -> dict[int, dict]:
    import ray

    started = init_ray(resources.ray_address)
    try:
        return _run_on_ray(pending, out, options, resources, fingerprints, progress_every)
    except Exception as e:
        cause = _user_error(e)
        if cause is not None:
            raise type(cause)(str(cause)) from None
        raise
    finally:
        if started:
            ray.shutdown()


def _run_on_ray(
    pending: list[Shard],
    out: str,
    options: CaptionOptions,
    resources: Resources,
    fingerprints: dict[int, dict],
    progress_every: float,
) -> dict[int, dict]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own lines: images/s per stage and an ETA
    ctx.enable_auto_log_stats = False
    progress = ray.remote(num_cpus=0)(Progress).remote()
    pool = dict(
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
        num_cpus=resources.cpus,
        num_gpus=resources.num_gpus or None,
    )
    items = [{"shard": pickle.dumps(s)} for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(
        read_batches,
        fn_kwargs={"batch_size": resources.batch_size, "progress": progress},
        num_cpus=min(1.0, resources.cpus),
    )
    args = {"fn_constructor_kwargs": {"options": options, "resources": resources, "progress": progress}}
    ds = ds.map(CaptionStage, **args, **pool)
    ds = ds.map(TextStage, **args, **pool)

    by_index = {s.index: s for s in pending}
    arrived: dict[int, list[dict]] = collections.defaultdict(list)
    last: dict[int, int] = {}
    results: dict[int, dict] = {}
    t0 = time.time()
    images_written = 0
    stop = threading.Event()

    def report() -> None:
        try:
            counts = ray.get(progress.counts.remote(), timeout=10)
        except Exception:  # noqa: BLE001 (progress is best effort)
            return
        print(
            progress_line(counts, t0, len(results), len(pending), images_written),
            file=sys.stderr,
            flush=True,
        )

    def ticker() -> None:  # a line every progress_every seconds, even while nothing arrives
        while not stop.wait(progress_every):
            report()

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        for row in ds.iter_rows():
            j = int(row["shard"])
            arrived[j].append(row)
            if row["last"]:
                last[j] = int(row["batch"])
            if j in last and len(arrived[j]) == last[j] + 1:
                stats = _write_shard(out, by_index[j], arrived.pop(j), options, fingerprints[j])
                results[j] = stats
                images_written += stats["captioned"]
                log.info(
                    "[%d/%d] %s: %d captions of %d images",
                    len(results),
                    len(pending),
                    stats["shard"],
                    stats["captions"],
                    stats["captioned"],
                )
        report()
    finally:
        stop.set()
    missing = set(by_index) - set(results)
    if missing:  # a bug: every shard ends with its last batch
        raise RuntimeError(f"shards {sorted(missing)} never completed")
    return results
