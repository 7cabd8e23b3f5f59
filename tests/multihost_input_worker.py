"""One process of the two-host input test (tests/test_data_multihost.py): 4 CPU devices each.

Usage: python tests/multihost_input_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR CONFIG.json SIGTERM_AT

Trains configs/tiny.py on CONFIG.json's data sources over data=2 x fsdp=4. With SIGTERM_AT > 0,
process 0 sends itself SIGTERM when its input iterator is asked for batch SIGTERM_AT (a preempted
host): JAX's preemption sync point stops both processes at one step, which is saved.
"""

import json
import os
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    pid, nproc, port, workdir, config_json, sigterm_at = sys.argv[1:7]
    pid, nproc, sigterm_at = int(pid), int(nproc), int(sigterm_at)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    from configs import tiny
    from veclip_jax.data.train_iterator import TrainIterator
    from veclip_jax.train import loop

    with open(config_json) as f:
        fields = json.load(f)
    c = tiny.get_config()
    c.update(dict(total_steps=fields.pop("total_steps"), checkpoint_every=0, eval_every=0, batch_size=16))
    c.mesh.update(data=2, fsdp=4, tensor=1)
    c.data.update(fields)
    if sigterm_at and pid == 0:
        original = TrainIterator.__next__
        calls = [0]

        def next_then_preempt(self):
            calls[0] += 1
            if calls[0] == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self)

        TrainIterator.__next__ = next_then_preempt
    result = loop.train(c, workdir)
    print(f"process {pid}: step {result.step} from {result.start_step} preempted {result.preempted}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
