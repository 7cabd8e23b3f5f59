"""Small builders shared by the tests."""

from __future__ import annotations

import contextlib
import signal

import numpy as np

from configs import tiny
from veclip_jax import defaults


def tiny_config(**optim):
    config = defaults.get_config()
    config.optim.warmup_steps = 0  # a non-zero learning rate from the first step
    config.optim.update(optim)
    return config


def random_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images (the batch's dtype: the model normalises them) and token rows, each with one
    end-of-text token."""
    rng = np.random.default_rng(seed)
    v, t = config.model.vision, config.model.text
    images = rng.integers(0, 256, size=(batch_size, v.image_size, v.image_size, 3), dtype=np.uint8)
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


def host_copy(tree):
    """A host (numpy) copy of every leaf: the train step donates its input state, so compare copies."""
    import jax

    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def differing_leaves(a, b) -> list[str]:
    """The paths of the leaves of two same-structured trees that are not bitwise equal."""
    import jax

    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b, (tree_a, tree_b)
    return [
        jax.tree_util.keystr(path)
        for (path, x), (_, y) in zip(flat_a, flat_b, strict=True)
        if np.asarray(x).dtype != np.asarray(y).dtype or not np.array_equal(x, y, equal_nan=True)
    ]


def logged_metrics(workdir: str) -> list[dict]:
    """The lines of a run's metrics.jsonl, checked to be one per step from step 1."""
    import os

    from veclip_jax.run.workdir import read_jsonl

    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))
    return lines


@contextlib.contextmanager
def deadline(seconds: int, what: str = "this test"):
    """Fails with TimeoutError when the block runs past `seconds` (SIGALRM): a Ray task that hangs
    (ray.get waits forever) fails its test instead of blocking CI."""

    def fire(*_):
        raise TimeoutError(f"{what} ran past {seconds} s: a Ray task, the pipeline or the cluster hangs")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
