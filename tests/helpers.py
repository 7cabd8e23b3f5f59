"""Small builders shared by the tests."""

from __future__ import annotations

import numpy as np

from configs import tiny
from veclip_jax import defaults


def tiny_config(**optim):
    config = defaults.get_config()
    config.optim.warmup_steps = 0  # a non-zero learning rate from the first step
    config.optim.update(optim)
    return config


def random_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Normalised-looking images and token rows, each with one end-of-text token."""
    rng = np.random.default_rng(seed)
    v, t = config.model.vision, config.model.text
    images = rng.normal(size=(batch_size, v.image_size, v.image_size, 3)).astype(np.float32)
    tokens = rng.integers(3, t.vocab_size, size=(batch_size, t.context_length)).astype(np.int32)
    lengths = rng.integers(1, t.context_length, size=batch_size)
    for row, n in zip(tokens, lengths, strict=True):
        row[n] = t.eos_id
        row[n + 1 :] = t.pad_id
    return {"image": images, "tokens": tokens}


TINY_RUN_STEPS = 8  # steps of the shared run; it checkpoints and evaluates at half and at the end


def tiny_run_config(demo_cache: str, **fields):
    """configs/tiny.py on the cached demo data, TINY_RUN_STEPS steps, saving and evaluating every half."""
    c = tiny.get_config()
    c.data.cache_dir = demo_cache
    half = TINY_RUN_STEPS // 2
    c.update(dict(total_steps=TINY_RUN_STEPS, checkpoint_every=half, eval_every=half) | fields)
    return c


def multihost_loop_config(demo_cache: str):
    """The two-host loop test's run: data=2 x fsdp=4 over 8 devices, saving and evaluating midway."""
    c = tiny_run_config(demo_cache, total_steps=6, checkpoint_every=3, eval_every=3)
    c.mesh.update(data=2, fsdp=4, tensor=1)
    return c
