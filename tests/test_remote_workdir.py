"""gs:// workdirs: the files the trainer writes itself go through the path layer (etils.epath).

The stand-in for Cloud Storage is fsspec's in-memory filesystem registered as the `gs` protocol, so
etils.epath (its fsspec backend, as on a TPU VM without TensorFlow) reads and writes gs://bucket/...
in memory. Orbax's checkpoints are not covered here: Orbax writes gs:// through TensorStore itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from veclip_jax.errors import ConfigError
from veclip_jax.fileio import append_text, as_path, atomic_write_json, is_local, normalize
from veclip_jax.run.workdir import WorkdirLock, keep_tokenizer, read_jsonl
from veclip_jax.train.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "gs://bucket/run"


class FakeGCS(MemoryFileSystem):
    """In-memory gs:// (epath asks for `gcs` with finalize_on_close=True, as gcsfs takes)."""

    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close: bool = False, **kwargs):
        super().__init__(*args, **kwargs)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """gs:// in memory, emptied per test; the test runs in tmp_path to catch local stray writes."""
    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs.clear()
    FakeGCS.pseudo_dirs.append("")
    monkeypatch.chdir(tmp_path)
    yield
    FakeGCS.store.clear()
    assert not (tmp_path / "gs:").exists()  # nothing went to a local directory named like the URL


def _names() -> set[str]:
    return {k.split("bucket/run/", 1)[-1] for k in FakeGCS.store}


def test_paths_stay_urls(tmp_path):
    assert not is_local(RUN) and is_local("workdir/demo") and is_local(tmp_path)
    assert normalize(RUN) == RUN and normalize("~/x").startswith("/")


def test_metrics_eval_and_tensorboard_go_to_the_bucket(gcs):
    w = MetricsWriter(RUN, enabled=True, start_step=0)
    for step in (10, 20, 30):
        w.train(step, {"loss": 1.0 / step})
    w.eval(20, {"zero_shot/top1": 0.5})
    w.close()
    assert [r["step"] for r in read_jsonl(f"{RUN}/metrics.jsonl")] == [10, 20, 30]
    assert read_jsonl(f"{RUN}/eval.jsonl") == [{"step": 20, "zero_shot/top1": 0.5}]
    events = [n for n in _names() if n.startswith("tensorboard/events")]
    assert len(events) == 1 and len(as_path(f"{RUN}/{events[0]}").read_bytes()) > 100
    # resume from step 20: the lines after it (a run that died after its checkpoint) are dropped
    MetricsWriter(RUN, enabled=True, start_step=20).close()
    assert [r["step"] for r in read_jsonl(f"{RUN}/metrics.jsonl")] == [10, 20]


def test_config_json_and_append(gcs):
    atomic_write_json(f"{RUN}/config.json", {"batch_size": 8})
    append_text(f"{RUN}/log.txt", "a\n")
    append_text(f"{RUN}/log.txt", "b\n")
    assert as_path(f"{RUN}/config.json").read_text() == '{"batch_size": 8}\n'
    assert as_path(f"{RUN}/log.txt").read_text() == "a\nb\n"


def test_tokenizer_copy_and_mismatch(gcs, tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"model-1")
    (tmp_path / "other.model").write_bytes(b"model-2")
    kept = keep_tokenizer(RUN, str(tmp_path / "spiece.model"), writer=True)
    assert kept == f"{RUN}/spiece.model" and as_path(kept).read_bytes() == b"model-1"
    assert keep_tokenizer(RUN, str(tmp_path / "spiece.model"), writer=False) == kept  # same: accepted
    with pytest.raises(ConfigError, match="config.data.tokenizer"):
        keep_tokenizer(RUN, str(tmp_path / "other.model"), writer=True)


def test_lock_is_best_effort_on_a_bucket(gcs, caplog):
    first = WorkdirLock(RUN).acquire()
    assert '"pid"' in as_path(f"{RUN}/.lock").read_text()
    second = WorkdirLock(RUN).acquire()  # a preempted pod's stale lock must not block the resume
    assert "best-effort" in caplog.text
    second.release()
    first.release()
    assert as_path(f"{RUN}/.lock").read_text() == ""


def test_a_gs_workdir_without_gcsfs_is_refused_in_one_line_naming_the_package(tmp_path):
    # No fake gs:// registered here, and gcsfs is not a requirement: the CLI says what to install.
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
           "--workdir=gs://bucket/run", f"--config.data.cache_dir={tmp_path}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last == "error: gs:// paths need gcsfs, which is not installed: pip install 'gcsfs==2026.10.1'"
