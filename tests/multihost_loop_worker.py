"""One process of the two-host training-loop test (tests/test_multihost.py): 4 CPU devices each.

Usage: python tests/multihost_loop_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DEMO_CACHE
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    pid, nproc, port, workdir, cache = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        sys.argv[5],
    )
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    from tests.helpers import multihost_loop_config
    from veclip_jax.train import loop

    result = loop.train(
        multihost_loop_config(cache), workdir, stop_after=int(os.environ.get("STOP_AFTER", "0")) or None
    )
    print(f"process {pid}: step {result.step} from {result.start_step}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
