"""Two processes on 127.0.0.1 (4 CPU devices each) train as one 8-device job."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from tests.helpers import random_batch, tiny_config
from tests.test_step import _run

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _two_hosts(worker: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Runs `worker PROCESS_ID 2 PORT *args` as two processes on 127.0.0.1; returns their output."""
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (env or {})
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), "2", str(port), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return logs


def test_two_hosts_give_the_single_process_losses(tmp_path):
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    _two_hosts(WORKER, str(tmp_path / "p{}.json"))
    results = [json.loads(o.read_text()) for o in outs]
    assert results[0]["devices"] == 8 and results[0]["local"] == 4
    assert results[0]["losses"] == results[1]["losses"]

    config = tiny_config()
    batches = [random_batch(config, 16, seed=s) for s in range(2)]
    _, want, _ = _run(config, dict(data=2, fsdp=4, tensor=1), batches, jax.devices())
    np.testing.assert_allclose(results[0]["losses"], want, rtol=2e-6)


LOOP_WORKER = os.path.join(os.path.dirname(__file__), "multihost_loop_worker.py")


def _two_host_run(workdir, demo_cache, stop_after=None) -> list[str]:
    return _two_hosts(LOOP_WORKER, str(workdir), demo_cache, env={"STOP_AFTER": str(stop_after or 0)})


def test_two_hosts_train_save_resume_and_evaluate_as_one_process(tmp_path, demo_cache):
    """The loop's multi-host paths: per-process input slices and iterator states in one Orbax
    checkpoint, summed bad-record counts, the preemption sync point, evaluation on a global mesh."""
    from tests.helpers import multihost_loop_config
    from veclip_jax.run.workdir import read_jsonl
    from veclip_jax.train import loop

    logs = _two_host_run(tmp_path / "hosts", demo_cache, stop_after=3)
    assert "process 0: step 3 from 0" in logs[0] and "process 1: step 3 from 0" in logs[1]
    saved = set(os.listdir(tmp_path / "hosts" / "checkpoints" / "3" / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= saved  # each host's input position
    logs = _two_host_run(tmp_path / "hosts", demo_cache)
    assert "process 1: step 6 from 3" in logs[1]

    loop.train(multihost_loop_config(demo_cache), str(tmp_path / "one"))
    hosts, one = (read_jsonl(str(tmp_path / d / "metrics.jsonl")) for d in ("hosts", "one"))
    assert [m["step"] for m in hosts] == list(range(1, 7))
    # The same examples per step (each host holds half of them, in another order): the same loss.
    np.testing.assert_allclose([m["loss"] for m in hosts], [m["loss"] for m in one], rtol=1e-5)
    evals = [read_jsonl(str(tmp_path / d / "eval.jsonl")) for d in ("hosts", "one")]
    assert [e["step"] for e in evals[0]] == [3, 6]
    for a, b in zip(*evals, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
