"""One batch schema (veclip_jax/batch.py): what the pipeline makes is what the step, init and compile read.

For every objective, the input pipeline asked for the objective's `inputs`
gives exactly those keys, with the schema's dtypes and shapes; the assembled
step's abstract batch (what launch/compile.py compiles) is the same table.
And the loop logs the objective's gauges (its temperature, SigLIP's bias) as
the window's last value, every other metric as the window's mean.
"""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from veclip_jax import batch, defaults
from veclip_jax.data.pipeline import make_train_iterator
from veclip_jax.data.skips import BAD_REASONS
from veclip_jax.objectives import OBJECTIVES, make_objective
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.recipes.declip import tiny_objective
from veclip_jax.train import loop
from veclip_jax.train.assembly import assemble

BATCH = 4


def _config(name: str, demo_cache: str):
    c = defaults.get_config("tiny")
    if name != "clip":
        tiny_objective(c, name)
    c.batch_size = BATCH
    c.data.cache_dir = demo_cache
    c.data.num_threads = 1
    return c


def test_the_schema_table():
    dims = batch.Dims(image_size=32, context_length=16, views=2)
    assert batch.shapes(("image", "tokens", "views", "mlm_labels"), 3, dims) == {
        "image": ((3, 32, 32, 3), np.uint8),  # pixels: the model normalises them (in jit)
        "tokens": ((3, 16), np.int32),
        "views": ((3, 2, 32, 32, 3), np.uint8),
        "mlm_labels": ((3, 16), np.int32),
    }
    assert batch.TEXT_INPUTS == {"text": "tokens", "eda": "tokens_eda", "mlm": "tokens_mlm"}
    with pytest.raises(ValueError, match="not in the schema"):
        batch.check_keys(("tokens", "no_image"))
    with pytest.raises(ValueError, match="lack 'tokens'"):
        batch.check_keys(("image",))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_the_pipeline_makes_exactly_the_objectives_inputs_as_the_schema_says(name, demo_cache):
    config = _config(name, demo_cache)
    objective = make_objective(config.objective)
    dims = batch.Dims(config.model.vision.image_size, config.model.text.context_length, objective.views)
    want = batch.shapes(objective.inputs, BATCH, dims)
    it = make_train_iterator(config, keys=objective.inputs, process_index=0, process_count=1)
    try:
        got = next(it)
    finally:
        it.close()
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == want
    # The step of the assembled run takes the same table, placed on the mesh (what compile.py compiles).
    run = assemble(config, make_mesh(config.mesh, jax.devices()[:1]), objective=objective)
    assert {k: (x.shape, x.dtype) for k, x in run.abstract_batch(BATCH).items()} == want


class _Writer:
    def __init__(self):
        self.lines = []

    def train(self, step, values):
        self.lines.append(values)


def test_gauges_are_logged_as_the_last_value_and_the_rest_as_the_mean():
    config = defaults.get_config("tiny")
    counters = dict.fromkeys(BAD_REASONS, 0)
    it = types.SimpleNamespace(counters=lambda: counters)
    writer = _Writer()
    monitor = loop._Monitor(config, writer, it, 0, 0, 0, False, objective=make_objective(None))
    for step, (loss, scale) in enumerate([(4.0, 10.0), (2.0, 11.0), (3.0, 12.0)], start=1):
        metrics = {"loss": loss, "logit_scale": scale, "learning_rate": 0.1 * step, "step_applied": 1.0}
        monitor.record(step, {k: np.float32(v) for k, v in metrics.items()}, last_checkpoint="none")
    monitor.log(3)
    (line,) = writer.lines
    assert line["loss"] == pytest.approx(3.0)  # the window's mean
    # The step's gauge and CLIP's (its temperature): the last value.
    assert line["logit_scale"] == 12.0 and line["learning_rate"] == pytest.approx(0.3)
    assert "step_applied" not in line
