"""One process of the multi-host test (tests/test_multihost.py): 4 CPU devices each.

Usage: python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json ("{}" in OUT: the process id)
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].format(sys.argv[1])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    from tests.helpers import random_batch, tiny_config
    from veclip_jax.objectives.model import build
    from veclip_jax.parallel.mesh import global_batch, make_mesh
    from veclip_jax.train.optim import make_optimizer
    from veclip_jax.train.state import init_train_state
    from veclip_jax.train.step import make_train_step

    config = tiny_config()
    mesh = make_mesh(dict(data=2, fsdp=4, tensor=1))
    model = build(config.model)
    tx = make_optimizer(config.optim, total_steps=100)
    init = init_train_state(model, tx, mesh, jax.random.key(config.seed))
    step = make_train_step(model, tx, mesh, init.shardings)
    state, losses = init.state, []
    for seed in range(2):
        full = random_batch(config, 16, seed=seed)
        rows = slice(pid * 16 // nproc, (pid + 1) * 16 // nproc)  # this host's slice
        state, metrics = step(state, global_batch(mesh, {k: v[rows] for k, v in full.items()}))
        losses.append(float(metrics["loss"]))
    with open(out, "w") as f:
        json.dump({"losses": losses, "devices": jax.device_count(), "local": jax.local_device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
