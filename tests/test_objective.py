"""The contrastive loss against a direct numpy formula, dense and blockwise on meshes."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from veclip_jax.objectives.clip import clip_loss
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.parallel.rules import batch_spec


def _embeds(b=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(b, d))
    txt = img + 0.8 * rng.normal(size=(b, d))  # correlated pairs, so accuracy is informative
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


def _numpy_reference(img, txt, scale):
    logits = scale * img.astype(np.float64) @ txt.T.astype(np.float64)

    def ce(z):  # cross-entropy with the diagonal as labels
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    b = len(img)
    sims = img @ txt.T
    return {
        "loss": (ce(logits) + ce(logits.T)) / 2,
        "i2t_accuracy": np.mean(np.argmax(logits, axis=1) == np.arange(b)),
        "t2i_accuracy": np.mean(np.argmax(logits.T, axis=1) == np.arange(b)),
        "positive_similarity": np.mean(np.diag(sims)),
        "negative_similarity": (sims.sum() - np.trace(sims)) / (b * (b - 1)),
    }


def test_loss_and_metrics_match_numpy_formula():
    img, txt = _embeds()
    loss, metrics = clip_loss(img, txt, 14.0)
    ref = _numpy_reference(img, txt, 14.0)
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
    for name, value in ref.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # Not vacuous: 10 and 11 of the 16 pairs rank first (the numpy reference's count, seed 0).
    assert (ref["i2t_accuracy"], ref["t2i_accuracy"]) == (10 / 16, 11 / 16)
    assert float(metrics["logit_scale"]) == 14.0


def _permuted_pairs(perm: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image i = e_i, text j = e_perm[j]: image i's best text is perm^-1(i), right where perm fixes i."""
    img = np.eye(len(perm), dtype=np.float32)
    return img, img[perm]


PERM = [0, 1, 2, 4, 3, 5, 7, 6]  # 4 fixed points of 8: 4 pairs rank their partner first


@pytest.mark.parametrize(
    "mesh_shape",
    [None, dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1)],
    ids=["dense", "data8", "data2_fsdp4"],
)
def test_batch_accuracy_is_the_fraction_of_pairs_ranked_first(mesh_shape):
    img, txt = _permuted_pairs(PERM)
    if mesh_shape is None:
        _, metrics = clip_loss(img, txt, 10.0)
    else:
        mesh = make_mesh(mesh_shape)
        shard = NamedSharding(mesh, batch_spec(2))
        loss_fn = jax.jit(lambda i, t: clip_loss(i, t, 10.0, mesh=mesh))
        _, metrics = loss_fn(jax.device_put(img, shard), jax.device_put(txt, shard))
    assert float(metrics["i2t_accuracy"]) == float(metrics["t2i_accuracy"]) == 4 / 8
    assert float(metrics["positive_similarity"]) == 4 / 8  # the fixed pairs' cosine is 1, the others' 0


@pytest.mark.parametrize(
    "shape",
    [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1), dict(data=4, fsdp=1, tensor=2)],
    ids=["data8", "data2_fsdp4", "data4_tensor2"],
)
def test_blockwise_loss_on_a_mesh_equals_global_formula(shape):
    mesh = make_mesh(shape)
    img, txt = _embeds()
    shard = NamedSharding(mesh, batch_spec(2))
    loss_fn = jax.jit(lambda i, t, s: clip_loss(i, t, s, mesh=mesh))
    loss, metrics = loss_fn(jax.device_put(img, shard), jax.device_put(txt, shard), 14.0)
    ref = _numpy_reference(img, txt, 14.0)
    for name, value in ref.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_gradient_on_a_mesh_equals_single_device_gradient():
    mesh = make_mesh(dict(data=2, fsdp=4, tensor=1))
    img, txt = _embeds()
    shard = NamedSharding(mesh, batch_spec(2))
    grad_mesh = jax.jit(jax.grad(lambda i, t, s: clip_loss(i, t, s, mesh=mesh)[0], argnums=(0, 1, 2)))
    grad_one = jax.grad(lambda i, t, s: clip_loss(i, t, s)[0], argnums=(0, 1, 2))
    got = grad_mesh(jax.device_put(img, shard), jax.device_put(txt, shard), 14.0)
    want = grad_one(img, txt, 14.0)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(want[0])).max() > 0
