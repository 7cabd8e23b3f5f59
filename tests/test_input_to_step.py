"""The input pipeline's batches drive the sharded train step, and the model learns."""

import jax
import numpy as np

from veclip_jax import defaults
from veclip_jax.data.pipeline import make_train_iterator
from veclip_jax.objectives.model import build
from veclip_jax.parallel.mesh import global_batch, make_mesh
from veclip_jax.train.optim import make_optimizer
from veclip_jax.train.state import init_train_state
from veclip_jax.train.step import make_train_step


def test_demo_batches_train_the_tiny_model_on_a_mesh(tmp_path):
    config = defaults.get_config()
    config.update(batch_size=32, total_steps=60)
    config.optim.update(learning_rate=1e-3, warmup_steps=5)
    config.data.cache_dir = str(tmp_path)
    config.mesh.update(data=2, fsdp=4)
    mesh = make_mesh(config.mesh)
    model = build(config.model)
    tx = make_optimizer(config.optim, config.total_steps)
    init = init_train_state(model, tx, mesh, jax.random.key(config.seed))
    step = make_train_step(model, tx, mesh, init.shardings)
    it = make_train_iterator(config)
    state, losses = init.state, []
    try:
        for _ in range(config.total_steps):
            state, metrics = step(state, global_batch(mesh, next(it)))
            losses.append(float(metrics["loss"]))
    finally:
        it.close()
    assert int(state.step) == config.total_steps
    # Chance level is log(32) = 3.47; the first steps sit near it.
    assert np.mean(losses[:5]) > 3.2
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5, losses
