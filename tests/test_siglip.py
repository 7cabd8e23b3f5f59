"""SigLIP through the objective seam: the numpy formula, the ring-chunked loss on meshes, the step, export."""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from tests.helpers import random_batch, tiny_config, tiny_run_config
from veclip_jax.config import ConfigError, validate_config
from veclip_jax.hf.to_hf import params_to_hf
from veclip_jax.objectives import make_objective
from veclip_jax.objectives.model import build
from veclip_jax.objectives.siglip import siglip_loss
from veclip_jax.parallel.mesh import global_batch, make_mesh
from veclip_jax.parallel.rules import batch_spec
from veclip_jax.run.workdir import read_jsonl
from veclip_jax.train.optim import make_optimizer
from veclip_jax.train.state import init_train_state
from veclip_jax.train.step import make_train_step

MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1),
    "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def _embeds(b=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(b, d))
    txt = img + 0.8 * rng.normal(size=(b, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


def _numpy_reference(img, txt, t, b):
    """The SigLIP paper's formula, written out: -1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b))."""
    sims = img.astype(np.float64) @ txt.T.astype(np.float64)
    n = len(img)
    z = 2 * np.eye(n) - 1
    loss = -np.sum(np.log(1 / (1 + np.exp(-z * (t * sims + b))))) / n
    neg = np.where(np.eye(n, dtype=bool), -np.inf, sims)
    pos = np.diag(sims)
    return {
        "loss": loss,
        "i2t_accuracy": np.mean(pos > neg.max(axis=1)),
        "t2i_accuracy": np.mean(pos > neg.max(axis=0)),
        "positive_similarity": np.mean(pos),
        "negative_similarity": (sims.sum() - np.trace(sims)) / (n * (n - 1)),
        "logit_bias": b,
        "logit_scale": t,
    }


def test_dense_loss_and_metrics_match_numpy_formula():
    img, txt = _embeds()
    loss, metrics = siglip_loss(img, txt, 10.0, -10.0)
    ref = _numpy_reference(img, txt, 10.0, -10.0)
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
    for name, value in ref.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert 0 < ref["i2t_accuracy"] < 1 and 0 < ref["t2i_accuracy"] < 1  # informative, not all or nothing
    assert ref["i2t_accuracy"] != ref["t2i_accuracy"]  # rows and columns are told apart


def _loss_and_grads(img, txt, t, b, mesh=None):
    def f(img, txt, t, b):
        return siglip_loss(img, txt, t, b, mesh=mesh)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(img, txt, t, b)


@pytest.mark.parametrize("name", list(MESHES))
def test_ring_chunked_loss_and_gradient_equal_the_dense_ones(name):
    img, txt = _embeds(b=16, d=8, seed=1)
    t, b = jnp.float32(7.0), jnp.float32(-3.0)  # moderate: every term contributes to the gradient
    (dense, dense_m), dense_g = _loss_and_grads(img, txt, t, b)
    mesh = make_mesh(MESHES[name])
    shard = NamedSharding(mesh, batch_spec(2))
    (chunked, chunked_m), chunked_g = _loss_and_grads(
        jax.device_put(img, shard), jax.device_put(txt, shard), t, b, mesh=mesh
    )
    np.testing.assert_allclose(chunked, dense, rtol=1e-5)
    for key in dense_m:
        np.testing.assert_allclose(chunked_m[key], dense_m[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for g_chunked, g_dense in zip(chunked_g, dense_g, strict=True):
        np.testing.assert_allclose(g_chunked, g_dense, rtol=1e-4, atol=1e-6)
    ref = _numpy_reference(img, txt, 7.0, -3.0)
    np.testing.assert_allclose(chunked, ref["loss"], rtol=1e-5)


def test_chunked_loss_counts_pairs_across_shards():
    """Each image's partner sits on another shard's text block would be a miss if the ring were skipped."""
    img = np.eye(8, dtype=np.float32)
    txt = img[[0, 1, 2, 4, 3, 5, 7, 6]]  # 4 fixed points; swapped pairs straddle shard boundaries
    mesh = make_mesh(MESHES["data8"])
    shard = NamedSharding(mesh, batch_spec(2))
    loss, metrics = jax.jit(lambda i, t: siglip_loss(i, t, 10.0, -5.0, mesh=mesh))(
        jax.device_put(img, shard), jax.device_put(txt, shard)
    )
    ref = _numpy_reference(img, txt, 10.0, -5.0)
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
    assert float(metrics["i2t_accuracy"]) == float(metrics["t2i_accuracy"]) == 4 / 8


def _siglip_config(**optim):
    config = tiny_config(**optim)
    config.objective.name = "siglip"
    return config


def _run(config, mesh_cfg, batches, devices=None):
    mesh = make_mesh(mesh_cfg, devices)
    model = build(config.model, make_objective(config.objective))
    tx = make_optimizer(config.optim, total_steps=100)
    init = init_train_state(model, tx, mesh, jax.random.key(config.seed))
    step = make_train_step(model, tx, mesh, init.shardings, grad_accum_steps=config.optim.grad_accum_steps)
    state, losses = init.state, []
    for batch in batches:
        state, metrics = step(state, global_batch(mesh, batch))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses, metrics


@pytest.fixture(scope="module")
def batches():
    return [random_batch(tiny_config(), 16, seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def one_device(batches):
    return _run(_siglip_config(), dict(data=1, fsdp=1, tensor=1), batches, jax.devices()[:1])


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def test_siglip_owns_bias_and_temperature_init_in_the_params_tree():
    config = _siglip_config()
    model = build(config.model, make_objective(config.objective))
    init = init_train_state(
        model, make_optimizer(config.optim, 10), make_mesh(MESHES["data8"]), jax.random.key(0)
    )
    params = jax.device_get(init.state.params)
    assert float(params["objective"]["bias"]) == -10.0
    np.testing.assert_allclose(params["logit_scale"], math.log(10.0), rtol=1e-6)
    clip = build(tiny_config().model)  # CLIP: no objective/ entry, the usual temperature
    assert clip.spec.heads(clip.dims) is None


@pytest.mark.parametrize("name", ["data2_fsdp4", "data2_fsdp2_tensor2"])
def test_siglip_step_is_the_same_on_one_and_eight_devices(one_device, batches, name):
    ref_params, ref_losses, ref_metrics = one_device
    params, losses, metrics = _run(_siglip_config(), MESHES[name], batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    assert _max_diff(params, ref_params) < 1e-5
    assert abs(float(ref_params["objective"]["bias"]) + 10.0) > 1e-4  # the bias is trained
    assert "logit_bias" in metrics


def test_siglip_gradient_accumulation_equals_the_large_batch(batches):
    mesh_cfg = MESHES["data2_fsdp4"]
    big, big_losses, _ = _run(_siglip_config(), mesh_cfg, batches)
    acc, acc_losses, _ = _run(_siglip_config(grad_accum_steps=2), mesh_cfg, batches)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=2e-6)
    assert _max_diff(acc, big) < 1e-5


def test_unknown_objective_is_refused_naming_the_field():
    config = tiny_config()
    config.objective.name = "moco"
    with pytest.raises(ConfigError, match=r"config\.objective\.name='moco'"):
        validate_config(config, num_devices=8)


def test_objective_without_exact_accumulation_refuses_grad_accum(monkeypatch):
    """An objective that needs more than pooled embeddings (SLIP's views, FILIP's tokens) refuses k > 1."""
    import dataclasses

    import veclip_jax.config

    token_level = dataclasses.replace(make_objective(_siglip_config().objective), pooled_only=False)
    monkeypatch.setattr(veclip_jax.config, "make_objective", lambda cfg: token_level)
    config = _siglip_config(grad_accum_steps=2)
    with pytest.raises(ConfigError, match=r"config\.optim\.grad_accum_steps=2.*'siglip'"):
        validate_config(config, num_devices=8)
    config.optim.grad_accum_steps = 1
    validate_config(config, num_devices=8)
    # The step refuses too, for callers that skip the config check.
    model = build(config.model, token_level)
    with pytest.raises(ValueError, match="grad_accum_steps=2"):
        make_train_step(model, None, None, None, grad_accum_steps=2)


def test_export_drops_the_objectives_parameters_and_says_so(one_device, caplog):
    params = one_device[0]
    with caplog.at_level(logging.INFO, logger="veclip_jax.hf.to_hf"):
        tensors = params_to_hf(params)
    clip_only = {k: v for k, v in params.items() if k != "objective"}
    assert sorted(tensors) == sorted(params_to_hf(clip_only))  # exactly CLIP's tensors, the bias dropped
    assert "logit_scale" in tensors
    assert "dropping the objective's own parameters" in caplog.text and "bias" in caplog.text
    with pytest.raises(ValueError, match="no HF name"):  # anything else unknown still refuses
        params_to_hf(dict(params, stray={"thing": np.zeros(3, np.float32)}))


def test_siglip_loss_falls_on_the_demo_data(demo_cache, tmp_path):
    from veclip_jax.train import loop

    config = tiny_run_config(demo_cache, total_steps=40, eval_every=0, checkpoint_every=0)
    config.objective.name = "siglip"
    loop.train(config, str(tmp_path))
    lines = read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
    losses = [m["loss"] for m in lines]
    assert "logit_bias" in lines[-1]  # the loop logs the objective's metrics by name
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    # The trained checkpoint loads for inference and export, objective parameters included.
    from veclip_jax.run.checkpoint import load_trained_params

    trained = load_trained_params(str(tmp_path))
    assert float(trained.params["objective"]["bias"]) != -10.0
    clip_only = {k: v for k, v in trained.params.items() if k != "objective"}
    assert sorted(params_to_hf(trained.params)) == sorted(params_to_hf(clip_only))
