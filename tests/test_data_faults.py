"""Input-side faults (issue 10): a damaged shard chunk, resuming with other worker counts, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from veclip_jax.data import demo, pipeline, records, train_iterator
from veclip_jax.data.skip_and_batch import TooManyBadRecordsError
from veclip_jax.defaults import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 40  # records in two shards of 20


def _config(files: list[str], tokenizer: str, **data):
    c = get_config()  # the tiny model: 32 px images
    c.batch_size = 8
    c.data.train_files = ",".join(files)
    c.data.tokenizer = tokenizer
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.data.update(data)
    return c


@pytest.fixture(scope="module")
def shards(demo_cache, tmp_path_factory) -> tuple[list[str], str]:
    """N demo records in two shards, and the demo tokenizer."""
    data = demo.ensure_demo_data(demo_cache)
    reader = records.RecordReader(data.train_files)
    out = str(tmp_path_factory.mktemp("faults") / "train")
    return records.write_shards((reader[i] for i in range(N)), out, 2), data.tokenizer


def _take(config, n: int, state=None, *, process_count: int = 1, snapshot=None):
    """n batches, the state after `snapshot` of them (default: all), and the skip counts at the end."""
    it = pipeline.make_train_iterator(config, process_index=0, process_count=process_count, include_ids=True)
    try:
        if state is not None:
            it.set_state(json.loads(json.dumps(state)))  # what a checkpoint stores
        batches, saved = [], None
        for i in range(n):
            if i == snapshot:
                saved = it.get_state()
            batches.append(next(it))
        return batches, saved if snapshot is not None else it.get_state(), it.bad_counts()
    finally:
        it.close()


def _ids(batches) -> list[tuple[int, int]]:
    return [(int(e), int(i)) for b in batches for e, i in zip(b["epoch"], b["index"], strict=True)]


# --- case 1: one flipped byte inside a shard's chunk ---------------------------------------------


def test_a_damaged_chunk_is_skipped_as_a_bad_record_naming_its_shard_and_resume_passes_it(
    shards, tmp_path, caplog
):
    files, tok = shards
    damaged = str(tmp_path / "damaged.array_record")
    data = bytearray(open(files[1], "rb").read())
    victim = records.RecordReader([files[1]])[7]  # global index 20 + 7 = 27
    middle = victim.jpeg[len(victim.jpeg) // 2 : len(victim.jpeg) // 2 + 32]
    at = data.find(middle)
    assert at > 0  # the record's bytes lie in the file as written (no compression)
    data[at + 5] ^= 0xFF  # header and footer intact: only this record's chunk hash fails
    open(damaged, "wb").write(bytes(data))
    files = [files[0], damaged]
    with pytest.raises(records.RecordFormatError, match=r"record 7 of shard .*damaged\.array_record"):
        records.RecordReader(files)[27]

    c = _config(files, tok, max_bad_fraction=0.1, bad_window=20)
    with caplog.at_level("WARNING"):
        batches, before, counts = _take(c, 10, snapshot=1)  # two epochs: the record is met twice
    assert counts["bad_record"] == 2
    assert (0, 27) not in _ids(batches) and len(set(_ids(batches))) == 80 - 2 + 2  # 78 others, 2 of epoch 2
    assert f"skipping record 7 of shard {damaged}" in caplog.text
    assert "chunk data hash mismatch" in caplog.text
    # A resume from just before the damage passes it too (it used to die there, every time).
    resumed, _, resumed_counts = _take(c, 9, before)
    assert _ids(resumed) == _ids(batches[1:])
    assert resumed_counts["bad_record"] == 2
    # max_bad_fraction governs: 1 bad record in a window of 8 is over 5 %.
    strict = _config(files, tok, max_bad_fraction=0.05, bad_window=8)
    with pytest.raises(TooManyBadRecordsError, match="bad_record=1"):
        _take(strict, 10)


# --- case 4: resuming with another data.num_workers ----------------------------------------------


@pytest.mark.parametrize("before,after", [(0, 2), (2, 0), (2, 1)])
def test_resume_with_another_worker_count_continues_without_repeats_or_gaps(shards, before, after):
    files, tok = shards
    c = _config(files, tok, num_workers=before)
    first, state, _ = _take(c, 3)
    c.data.num_workers = after
    second, final, _ = _take(c, 4, state)
    seen = _ids(first) + _ids(second)
    assert len(seen) == len(set(seen)) == 7 * 8, "an example was read twice"
    # Every position below the final frontier, and exactly those beyond it that the state lists, were read.
    order = np.concatenate([pipeline.epoch_order(c.seed, N, e) for e in range(3)])
    consumed = list(range(final["position"])) + final["consumed_beyond"]
    assert sorted(seen) == sorted((p // N, int(order[p])) for p in consumed), "an example was skipped"


def test_a_saved_position_from_another_process_count_is_refused_naming_it(shards):
    files, tok = shards
    c = _config(files, tok)
    _, state, _ = _take(c, 1)
    with pytest.raises(train_iterator.InputStateError, match="saved by 1 processes; this run has 2"):
        _take(c, 1, state, process_count=2)


# --- case 6: kill -9 of the trainer --------------------------------------------------------------

_CHILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from absl import flags
flags.FLAGS.mark_as_parsed()
from tests.test_data_faults import _config
from veclip_jax.data import pipeline

if __name__ == "__main__":
    c = _config({files!r}, {tok!r}, num_workers=2)
    it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
    next(it)
    print("READY", flush=True)
    time.sleep(600)
"""


def _descendants(pid: int) -> set[int]:
    """Live (not zombie) descendants of `pid`, from /proc."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != "Z":
                parent_of[int(entry)] = int(stat[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(p)
        except OSError:
            pass
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_processes_exit_when_the_trainer_is_killed(shards, tmp_path):
    files, tok = shards
    script = tmp_path / "trainer.py"
    script.write_text(_CHILD.format(repo=REPO, files=files, tok=tok))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    workers: set[int] = set()
    try:
        assert child.stdout.readline().strip() == "READY"
        workers = _descendants(child.pid)  # grain's two workers and the resource tracker
        assert len(workers) >= 2
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 5
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers), f"still running after the trainer died: {_alive(workers)}"
    finally:
        if child.poll() is None:
            child.kill()
        for p in _alive(workers | _descendants(child.pid)):  # never leave them behind, even on failure
            os.kill(p, signal.SIGKILL)
