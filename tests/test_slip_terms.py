"""SLIP's NT-Xent term against numpy formulas, dense and blockwise on meshes (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from veclip_jax.objectives.slip import nt_xent_loss
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.parallel.rules import batch_spec

MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1),
    "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def _views(b=16, d=8, seed=0):
    """Two correlated, unnormalised views (norms far from 1, so normalisation is exercised)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(b, d))
    z1 = 3.0 * (base + 0.7 * rng.normal(size=(b, d)))
    z2 = 0.5 * (base + 0.7 * rng.normal(size=(b, d)))
    return z1.astype(np.float32), z2.astype(np.float32)


def _simclr_reference(z1, z2, tau):
    """SimCLR's formula: 2B anchors, positive = the other view, denominator = all but the anchor itself."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    b = n // 2
    sims = z @ z.T / tau
    losses, correct = [], []
    for k in range(n):
        pos = (k + b) % n
        others = [j for j in range(n) if j != k]
        row = sims[k, others]
        losses.append(np.log(np.sum(np.exp(row))) - sims[k, pos])
        correct.append(others[int(np.argmax(row))] == pos)
    return np.mean(losses), np.mean(correct)


def _toolkit_gather_reference(z1, z2, tau, ranks):
    """The toolkit's NT_Xent_gather run on `ranks` simulated ranks, each loss averaged over ranks.

    Rank r: rows = its [z1_r; z2_r], columns = [all z1; all z2]; logits = [positive, negatives],
    the negatives being every column but the anchor's own two (its own view and its positive).
    """
    a, b = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in (z1.astype(float), z2.astype(float)))
    big_b = len(a)
    bs = big_b // ranks
    cols = np.concatenate([a, b])
    rank_losses = []
    for r in range(ranks):
        rows = np.concatenate([a[r * bs : (r + 1) * bs], b[r * bs : (r + 1) * bs]])
        sim = rows @ cols.T / tau  # [2bs, 2B]
        total = 0.0
        for i in range(2 * bs):
            g = r * bs + i % bs  # the image's global index
            own, pos = (g, big_b + g) if i < bs else (big_b + g, g)
            neg = [j for j in range(2 * big_b) if j not in (own, pos)]
            logits = np.concatenate([[sim[i, pos]], sim[i, neg]])
            total += np.log(np.sum(np.exp(logits))) - logits[0]
        rank_losses.append(total / (2 * bs))
    return np.mean(rank_losses)


def test_loss_and_accuracy_match_the_simclr_formula():
    z1, z2 = _views()
    loss, metrics = nt_xent_loss(z1, z2, 0.1)
    ref_loss, ref_acc = _simclr_reference(z1, z2, 0.1)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["ssl_loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["ssl_accuracy"], ref_acc, rtol=1e-6)
    assert 0 < ref_acc < 1  # informative: some anchors rank their positive first, some not
    assert sorted(metrics) == ["ssl_accuracy", "ssl_loss"]


def test_the_simclr_formula_is_the_toolkits_gathered_masking():
    """Positive first + negatives = all but the anchor's own two entries, averaged over ranks = SimCLR."""
    z1, z2 = _views(seed=3)
    want, _ = _simclr_reference(z1, z2, 0.5)
    for ranks in (1, 4):
        np.testing.assert_allclose(_toolkit_gather_reference(z1, z2, 0.5, ranks), want, rtol=1e-12)
    loss, _ = nt_xent_loss(z1, z2, 0.5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_inputs_are_normalised_inside_in_float32():
    z1, z2 = _views(seed=2)
    scales = np.linspace(0.1, 10.0, len(z1), dtype=np.float32)[:, None]
    base, _ = nt_xent_loss(z1, z2, 0.2)
    rescaled, _ = nt_xent_loss(z1 * scales, z2 * scales[::-1], 0.2)
    np.testing.assert_allclose(rescaled, base, rtol=1e-5)
    low, _ = nt_xent_loss(jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16), 0.2)
    assert low.dtype == jnp.float32


def test_perfect_views_rank_every_positive_first():
    eye = np.eye(8, dtype=np.float32)
    loss, metrics = nt_xent_loss(eye, 2 * eye, 0.5)
    assert float(metrics["ssl_accuracy"]) == 1.0
    # Positive logit 2, the 14 negatives 0 (the self logit, also 2, is excluded).
    np.testing.assert_allclose(loss, np.log(np.exp(2.0) + 14) - 2.0, rtol=1e-6)


def _value_and_grads(z1, z2, tau, mesh=None):
    f = lambda a, b, t: nt_xent_loss(a, b, t, mesh=mesh)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(z1, z2, tau)


@pytest.mark.parametrize("name", list(MESHES))
def test_blockwise_loss_and_gradient_equal_the_dense_ones(name):
    z1, z2 = _views(seed=1)
    tau = jnp.float32(0.3)
    (dense, dense_m), dense_g = _value_and_grads(z1, z2, tau)
    mesh = make_mesh(MESHES[name])
    shard = NamedSharding(mesh, batch_spec(2))
    (got, got_m), got_g = _value_and_grads(jax.device_put(z1, shard), jax.device_put(z2, shard), tau, mesh)
    np.testing.assert_allclose(got, dense, rtol=1e-5)
    for key in dense_m:
        np.testing.assert_allclose(got_m[key], dense_m[key], rtol=1e-5, err_msg=key)
    for g, w in zip(got_g, dense_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    assert all(np.abs(np.asarray(w)).max() > 1e-3 for w in dense_g)  # not vacuous
    np.testing.assert_allclose(dense, _simclr_reference(z1, z2, 0.3)[0], rtol=1e-5)


def test_positives_across_shards_are_found_on_a_mesh():
    """Images 3 and 12 (on different shards) have swapped second views: their 4 anchors miss."""
    eye = np.eye(16, dtype=np.float32)
    z1, z2 = eye, eye[[0, 1, 2, 12, 4, 5, 6, 7, 8, 9, 10, 11, 3, 13, 14, 15]]
    mesh = make_mesh(MESHES["data8"])
    shard = NamedSharding(mesh, batch_spec(2))
    loss, metrics = jax.jit(lambda a, b: nt_xent_loss(a, b, 0.1, mesh=mesh))(
        jax.device_put(z1, shard), jax.device_put(z2, shard)
    )
    ref_loss, ref_acc = _simclr_reference(z1, z2, 0.1)
    assert ref_acc == 28 / 32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["ssl_accuracy"], ref_acc, rtol=1e-6)
