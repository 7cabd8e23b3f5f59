"""The sharded train step: same math on every mesh, exact accumulation, safety rails."""

import jax
import numpy as np
import pytest

from tests.helpers import random_batch, tiny_config
from veclip_jax.objectives.model import build
from veclip_jax.parallel.mesh import global_batch, make_mesh, mesh_shape
from veclip_jax.train.optim import make_optimizer
from veclip_jax.train.state import init_train_state
from veclip_jax.train.step import make_train_step

MESHES = {
    "one_device": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
    "data4_tensor2": dict(data=4, fsdp=1, tensor=2),
}
STEPS = 3
BATCH = 16


def _run(config, mesh_cfg, batches, devices=None):
    """Initialises from seed 0 on the mesh and applies one step per batch."""
    mesh = make_mesh(mesh_cfg, devices)
    model = build(config.model)
    tx = make_optimizer(config.optim, total_steps=100)
    init = init_train_state(model, tx, mesh, jax.random.key(config.seed))
    step = make_train_step(model, tx, mesh, init.shardings, grad_accum_steps=config.optim.grad_accum_steps)
    state, losses = init.state, []
    for batch in batches:
        state, metrics = step(state, global_batch(mesh, batch))
        losses.append(float(metrics["loss"]))
    return state, losses, init


@pytest.fixture(scope="module")
def runs():
    config = tiny_config()
    batches = [random_batch(config, BATCH, seed=s) for s in range(STEPS)]
    out = {}
    for name, mesh_cfg in MESHES.items():
        devices = jax.devices()[:1] if name == "one_device" else None
        state, losses, _ = _run(config, mesh_cfg, batches, devices)
        out[name] = (losses, jax.device_get(state.params))
    return out


@pytest.mark.parametrize("name", [n for n in MESHES if n != "one_device"])
def test_same_losses_on_every_mesh(runs, name):
    np.testing.assert_allclose(runs[name][0], runs["one_device"][0], rtol=2e-6)


@pytest.mark.parametrize("name", [n for n in MESHES if n != "one_device"])
def test_same_updated_parameters_on_every_mesh(runs, name):
    ref, got = runs["one_device"][1], runs[name][1]
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got, ref)
    assert max(jax.tree.leaves(diffs)) < 1e-5
    # ... and training did move them (the comparison is not vacuous).
    init = _run(tiny_config(), MESHES["one_device"], [], jax.devices()[:1])[0].params
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ref, jax.device_get(init))
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_parameters_are_initialised_sharded_by_the_rules():
    config = tiny_config()
    _, _, init = _run(config, dict(data=2, fsdp=2, tensor=2), [])
    q = init.state.params["text_model"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
    # Each device holds a quarter of the kernel: fsdp x tensor = 4 shards.
    assert q.addressable_shards[0].data.size == q.size // 4
    mu = init.state.opt_state[1][0].mu["text_model"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert mu.sharding == q.sharding


def test_gradient_accumulation_equals_the_large_batch():
    batches = [random_batch(tiny_config(), BATCH, seed=s) for s in range(2)]
    mesh_cfg = dict(data=2, fsdp=4, tensor=1)
    big_state, big_losses, _ = _run(tiny_config(), mesh_cfg, batches)
    acc_state, acc_losses, _ = _run(tiny_config(grad_accum_steps=2), mesh_cfg, batches)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=2e-6)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), acc_state.params, big_state.params)
    assert max(jax.tree.leaves(diffs)) < 1e-5


def _host_copy(tree):
    """A host copy of every leaf: the step donates its input state, so compare copies."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _differing_leaves(a, b) -> list[str]:
    """The paths of the leaves of two same-structured trees that are not bitwise equal."""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    return [
        jax.tree_util.keystr(path)
        for (path, x), (_, y) in zip(flat_a, flat_b, strict=True)
        if x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=True)
    ]


def test_non_finite_loss_leaves_parameters_and_optimizer_state_unchanged_and_counts_it():
    config = tiny_config()
    mesh = make_mesh(dict(data=8, fsdp=1, tensor=1))
    model = build(config.model)
    tx = make_optimizer(config.optim, total_steps=100)
    init = init_train_state(model, tx, mesh, jax.random.key(config.seed))
    step = make_train_step(model, tx, mesh, init.shardings)
    bad = random_batch(config, BATCH)
    bad["image"] = bad["image"].astype(np.float32)  # float pixels (0-255) the model also takes: NaN-able
    bad["image"][0, 0, 0, 0] = np.nan
    before = _host_copy(init.state)

    state, metrics = step(init.state, global_batch(mesh, bad))
    skipped = _host_copy(state)
    assert not np.isfinite(float(metrics["loss"])) and float(metrics["step_applied"]) == 0.0
    assert int(skipped.step) == 0 and int(skipped.nonfinite_steps) == 1
    assert _differing_leaves(skipped.params, before.params) == []  # bit for bit
    assert _differing_leaves(skipped.opt_state, before.opt_state) == []

    # The next, finite, step is applied: parameters and every optimizer moment move.
    state, metrics = step(state, global_batch(mesh, random_batch(config, BATCH, seed=1)))
    applied = _host_copy(state)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["step_applied"]) == 1.0
    assert int(applied.step) == 1 and int(applied.nonfinite_steps) == 1
    assert _differing_leaves(applied.params, skipped.params) != []
    moved = _differing_leaves(applied.opt_state, skipped.opt_state)
    for part in (".count", ".mu", ".nu"):
        assert any(part in path for path in moved), part


@pytest.mark.parametrize(
    "mesh_cfg, message",
    [
        (dict(data=3, fsdp=-1, tensor=1), "does not divide"),
        (dict(data=2, fsdp=2, tensor=1), "covers 4 devices"),
        (dict(data=-1, fsdp=-1, tensor=1), "only one axis"),
        (dict(data=0, fsdp=1, tensor=1), "config.mesh.data"),
    ],
)
def test_bad_mesh_is_refused_with_the_field_named(mesh_cfg, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(mesh_cfg, 8)


def test_minus_one_takes_the_remaining_devices():
    assert mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
