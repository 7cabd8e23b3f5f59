"""The tiny model on the demo data, for tests: a run takes seconds on a CPU.

  python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny

2-layer towers of width 64 on 32 px crops, batch 32, 20 steps, logging every
step, evaluating and checkpointing every 10. Not meant to learn much.
"""

from veclip_jax import defaults


def get_config():
    c = defaults.get_config("tiny")
    c.batch_size = 32
    c.total_steps = 20
    c.log_every = 1
    c.eval_every = 10
    c.checkpoint_every = 10
    c.optim.warmup_steps = 2
    c.optim.learning_rate = 1e-3
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.eval_batch_size = 128
    return c
