"""Two processes on 127.0.0.1 (4 CPU devices each) read every example of an epoch once, and resume
after a SIGTERM without repeats or gaps: for an ArrayRecord mixture and for tar + Parquet sources."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_data_sources import _tar
from tests.test_multihost import _two_hosts
from veclip_jax.data import demo, pipeline, records
from veclip_jax.defaults import get_config
from veclip_jax.run.workdir import read_jsonl

WORKER = os.path.join(os.path.dirname(__file__), "multihost_input_worker.py")
PER_FILE, FILES, STEPS = 6, 4, 8


@pytest.fixture(scope="module")
def corpus(demo_cache, tmp_path_factory):
    data = demo.ensure_demo_data(demo_cache)
    reader = records.RecordReader(data.train_files)
    n = PER_FILE * FILES
    recs = [reader[i] for i in range(3 * n)]
    root = tmp_path_factory.mktemp("mh_corpus")
    records.write_shards(iter(recs[:n]), str(root / "a"), 2)
    records.write_shards(iter(recs[n : 2 * n]), str(root / "b"), 2)
    part = recs[2 * n :]
    for f in range(FILES):
        rows = part[f * PER_FILE : (f + 1) * PER_FILE]
        texts = [r.alt_text or r.vecap_text for r in rows]
        _tar(
            root / f"{f:05d}.tar",
            [(r.key, {"jpg": r.jpeg, "txt": t.encode()}) for r, t in zip(rows, texts, strict=True)],
        )
        pq.write_table(pa.table({"jpg": [r.jpeg for r in rows], "caption": texts}), root / f"{f}.parquet")
    return root, data.tokenizer


def _data_fields(corpus, kind: str) -> dict:
    root, tok = corpus
    if kind == "array_record":
        sources = {"a": dict(files=str(root / "a-*"), weight=2.0), "b": dict(files=str(root / "b-*"))}
    else:
        sources = {"ar": dict(files=str(root / "a-*")), "tar": dict(files=str(root / "*.tar")),
                   "pq": dict(files=str(root / "*.parquet"))}  # fmt: skip
    return dict(sources=sources, tokenizer=tok, num_threads=2, shuffle_buffer=4, max_bad_fraction=0.0)


def _replay(fields: dict, process_index: int, steps: int):
    """Process `process_index`'s input, read outside the run: its batches and its state after each."""
    c = get_config("tiny")
    c.batch_size = 16
    c.data.update(fields)
    it = pipeline.make_train_iterator(c, process_index=process_index, process_count=2, include_ids=True)
    try:
        batches, states = [], []
        for _ in range(steps):
            batches.append(next(it))
            states.append(json.loads(json.dumps(it.get_state())))
        return batches, states
    finally:
        it.close()


@pytest.mark.parametrize("kind", ["array_record", "streamed"])
def test_two_hosts_read_each_example_once_and_resume_after_sigterm_without_repeats_or_gaps(
    corpus, tmp_path, kind
):
    fields = _data_fields(corpus, kind)
    config_json = tmp_path / "data.json"
    config_json.write_text(json.dumps(fields | {"total_steps": STEPS}))
    workdir = tmp_path / "run"
    logs = _two_hosts(WORKER, str(workdir), str(config_json), "3")  # process 0 gets SIGTERM at batch 3
    stopped = int(logs[0].split("process 0: step ")[1].split()[0])
    assert "preempted True" in logs[0] and f"process 1: step {stopped} from 0 preempted True" in logs[1]
    assert 3 <= stopped < STEPS
    logs = _two_hosts(WORKER, str(workdir), str(config_json), "0")
    assert f"process 1: step {STEPS} from {stopped}" in logs[1]

    seen = []
    for p in range(2):
        batches, states = _replay(fields, p, 2 * STEPS)  # the run's batches, then as many more
        for step in (stopped, STEPS):
            with open(workdir / "checkpoints" / str(step) / "data" / f"process_{p}-of-2.json") as f:
                saved = json.load(f)
            # The run's saved input position is the replay's after as many batches: the run read
            # exactly these batches before the SIGTERM, and exactly the next ones after the resume.
            assert saved == states[step - 1], (p, step)
        seen += [
            (int(s), int(e), int(i))
            for b in batches
            for s, e, i in zip(b["source"], b["epoch"], b["index"], strict=True)
        ]
    assert len(seen) == len(set(seen)), "an example was read twice (by one process, or by both)"
    # Every example of epoch 0 of every source was read, by one process.
    for source, name in enumerate(fields["sources"]):
        epoch0 = sorted(i for s, e, i in seen if s == source and e == 0)
        assert len(epoch0) == PER_FILE * FILES, f"{name}: {len(epoch0)} of its epoch-0 examples were read"
    metrics = read_jsonl(str(workdir / "metrics.jsonl"))
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    last = metrics[-1]
    names = list(fields["sources"])
    assert sum(last[f"examples/{n}"] for n in names) == 16 * STEPS  # summed over both hosts
    assert sum(last[f"mix/{n}"] for n in names) == pytest.approx(1.0)
