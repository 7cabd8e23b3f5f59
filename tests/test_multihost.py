"""Two processes on 127.0.0.1 (4 CPU devices each) train as one 8-device job."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker

from tests.helpers import random_batch, tiny_config
from tests.test_step import _run

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def test_two_hosts_give_the_single_process_losses(tmp_path):
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), "2", str(port), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    assert results[0]["devices"] == 8 and results[0]["local"] == 4
    assert results[0]["losses"] == results[1]["losses"]

    config = tiny_config()
    batches = [random_batch(config, 16, seed=s) for s in range(2)]
    _, want, _ = _run(config, dict(data=2, fsdp=4, tensor=1), batches, jax.devices())
    np.testing.assert_allclose(results[0]["losses"], want, rtol=2e-6)
