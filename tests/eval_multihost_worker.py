"""One process of the two-process evaluation test (tests/test_eval_tasks.py): 4 CPU devices each.

Usage: python tests/eval_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT SPEC_JSON
SPEC_JSON: {"params": npz of the flattened parameters, "workdir": the run (config, tokenizer),
"entries": registry entries, "data_dir", "batch_size", "out": a path with {} for the process id}.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    pid, nproc, port, spec_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    import ml_collections
    import numpy as np
    from flax import traverse_util

    from veclip_jax.data.image_ops import EvalPreprocess
    from veclip_jax.data.tokenizer import load_tokenizer
    from veclip_jax.eval import embed
    from veclip_jax.eval.run import run_tasks
    from veclip_jax.objectives.model import build
    from veclip_jax.run.workdir import find_tokenizer

    with open(spec_path) as f:
        spec = json.load(f)
    with open(os.path.join(spec["workdir"], "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f)["model"])
    flat = dict(np.load(spec["params"]))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    t = cfg.text
    tok = load_tokenizer(find_tokenizer(spec["workdir"]), t.context_length, pad_id=t.pad_id, eos_id=t.eos_id)
    size = cfg.vision.image_size
    reads = []
    load = embed.load_image
    embed.load_image = lambda image: reads.append(image) or load(image)  # the images this process decodes
    results, _ = run_tasks(
        build(cfg), params, tok, EvalPreprocess(size, size), spec["entries"],
        data_dir=spec["data_dir"], batch_size=spec["batch_size"],
    )  # fmt: skip
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    with open(spec["out"].format(pid), "w") as f:
        json.dump({"results": results, "reads": reads}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
