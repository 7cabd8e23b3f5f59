"""DeCLIP's loss terms and text queue against numpy formulas; the contrastive ones on meshes too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from veclip_jax.defaults import BATCH_AXES
from veclip_jax.objectives.declip import (
    clip_mvs_loss,
    mlm_loss,
    nn_loss,
    queue_init,
    queue_nearest,
    queue_push,
    simsiam_loss,
)
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.parallel.rules import batch_spec

MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1),
    "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _correlated(n_sets, b=16, d=8, seed=0, noise=0.8):
    """`n_sets` unit [b, d] arrays whose row i are noisy copies of one vector (informative logits)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(b, d))
    return [_unit(base + noise * rng.normal(size=(b, d))) for _ in range(n_sets)]


def _ce_rows(logits):
    """Mean cross-entropy of each row with its diagonal entry as the label (float64)."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(logp))


# --- SimSiam ---------------------------------------------------------------------------------------


def _cos_rows(p, z):
    p, z = p.astype(np.float64), z.astype(np.float64)
    return np.sum(p * z, axis=1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1))


def test_simsiam_matches_the_formula_and_stops_the_gradient_at_z():
    rng = np.random.default_rng(0)
    p1, p2, z1, z2 = (rng.normal(size=(6, 5)).astype(np.float32) * s for s in (1, 3, 0.5, 2))
    loss = simsiam_loss(p1, p2, z1, z2)
    want = -0.5 * (np.mean(_cos_rows(p1, z2)) + np.mean(_cos_rows(p2, z1)))
    np.testing.assert_allclose(loss, want, rtol=1e-6)

    g_p1, g_p2, g_z1, g_z2 = jax.grad(simsiam_loss, argnums=(0, 1, 2, 3))(p1, p2, z1, z2)
    assert not np.any(g_z1) and not np.any(g_z2)  # stop-gradient on the projector outputs

    def d_cos_dp(p, z):  # d cos(p, z) / dp = (z^ - cos * p^) / |p|
        p, z = p.astype(np.float64), z.astype(np.float64)
        pn, zn = np.linalg.norm(p, axis=1, keepdims=True), np.linalg.norm(z, axis=1, keepdims=True)
        return (z / zn - _cos_rows(p, z)[:, None] * p / pn) / pn

    b = len(p1)
    np.testing.assert_allclose(g_p1, -0.5 / b * d_cos_dp(p1, z2), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_p2, -0.5 / b * d_cos_dp(p2, z1), rtol=1e-5, atol=1e-7)


def test_simsiam_on_a_mesh_equals_one_device():
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(16, 8)).astype(np.float32) for _ in range(4)]
    mesh = make_mesh(MESHES["data2_fsdp4"])
    shard = NamedSharding(mesh, batch_spec(2))
    got = jax.jit(simsiam_loss)(*(jax.device_put(a, shard) for a in arrays))
    np.testing.assert_allclose(got, simsiam_loss(*arrays), rtol=1e-6)


# --- MLM -------------------------------------------------------------------------------------------


def _mlm_inputs(b=3, length=7, vocab=11, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, length, vocab)).astype(np.float32) * 2
    labels = np.full((b, length), -1, np.int32)
    picks = rng.random((b, length)) < 0.4
    labels[picks] = rng.integers(0, vocab, size=picks.sum())
    labels[0, 0] = int(np.argmax(logits[0, 0]))  # at least one labelled position predicted right
    return logits, labels


def _mlm_reference(logits, labels):
    losses, hits = [], []
    for i, j in zip(*np.nonzero(labels >= 0), strict=True):
        row = logits[i, j].astype(np.float64)
        losses.append(np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[labels[i, j]])
        hits.append(np.argmax(row) == labels[i, j])
    return np.mean(losses), np.mean(hits)


def test_mlm_is_the_mean_cross_entropy_over_labelled_positions():
    logits, labels = _mlm_inputs()
    loss, acc = mlm_loss(logits, labels)
    ref_loss, ref_acc = _mlm_reference(logits, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)
    assert 0 < ref_acc < 1


def test_mlm_ignores_unlabelled_positions():
    logits, labels = _mlm_inputs(seed=1)
    noise = np.random.default_rng(5).normal(size=logits.shape).astype(np.float32) * 10
    changed = np.where((labels >= 0)[..., None], logits, logits + noise)
    for a, b in zip(mlm_loss(logits, labels), mlm_loss(changed, labels), strict=True):
        assert float(a) == float(b)
    grad = jax.grad(lambda x: mlm_loss(x, labels)[0])(logits)
    assert not np.any(np.asarray(grad)[labels < 0])
    assert np.any(np.asarray(grad)[labels >= 0])


def test_mlm_computes_bfloat16_logits_in_float32_and_survives_no_labels():
    logits, labels = _mlm_inputs(seed=2, vocab=50)
    low = jnp.asarray(logits, jnp.bfloat16)
    loss, acc = mlm_loss(low, labels)
    assert loss.dtype == jnp.float32
    ref_loss, ref_acc = _mlm_reference(np.asarray(low.astype(jnp.float32)), labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)
    none = np.full_like(labels, -1)
    loss, acc = mlm_loss(logits, none)
    assert float(loss) == 0.0 and float(acc) == 0.0
    assert np.all(np.isfinite(jax.grad(lambda x: mlm_loss(x, none)[0])(logits)))


# --- the text queue --------------------------------------------------------------------------------


def test_queue_init_is_random_unit_vectors_and_pointer_zero():
    state = queue_init(jax.random.key(0), 10, 4)
    assert state["queue"].shape == (10, 4) and state["queue"].dtype == jnp.float32
    assert state["ptr"].shape == () and state["ptr"].dtype == jnp.int32 and int(state["ptr"]) == 0
    np.testing.assert_allclose(np.linalg.norm(state["queue"], axis=1), 1.0, rtol=1e-6)
    assert np.linalg.matrix_rank(np.asarray(state["queue"])) == 4
    assert not np.array_equal(state["queue"], queue_init(jax.random.key(1), 10, 4)["queue"])


def _fifo_reference(queue, ptr, x):
    """Row by row: write at ptr, advance modulo size."""
    queue = queue.copy()
    for row in _unit(x):
        queue[ptr] = row
        ptr = (ptr + 1) % len(queue)
    return queue, ptr


@pytest.mark.parametrize("b", [4, 10, 13], ids=["wraps", "equal_size", "more_than_size"])
def test_queue_push_writes_fifo_modulo_size_and_advances_the_pointer(b):
    size = 10  # not a multiple of 4: the third push of 4 wraps round the end
    state = queue_init(jax.random.key(0), size, 3)
    queue, ptr = np.asarray(state["queue"]), 0
    push = jax.jit(queue_push)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(size=(b, 3)).astype(np.float32) * 5
        state = push(state, x)
        queue, ptr = _fifo_reference(queue, ptr, x)
        assert int(state["ptr"]) == ptr and state["ptr"].dtype == jnp.int32
        np.testing.assert_allclose(state["queue"], queue, rtol=1e-6)
    if b == 4:
        assert ptr == 2  # 12 rows pushed into 10 slots


def test_queue_push_stores_no_gradient():
    state = queue_init(jax.random.key(0), 6, 3)
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(queue_push(state, x)["queue"]))(x)
    assert not np.any(grad)


def _nearest_reference(queue, x):
    sims = _unit(x).astype(np.float64) @ _unit(queue).astype(np.float64).T
    return np.argmax(sims, axis=1)  # numpy: the first maximum


def _queue_with_a_tie(size, d, a, b, seed):
    """Unit rows orthogonal to e0, except rows a and b: (e0 + e1)/sqrt2 and (e0 - e1)/sqrt2.

    A query along e0 scores exactly 1/sqrt2 against both (different rows, equal cosine): the tie.
    """
    queue = np.random.default_rng(seed).normal(size=(size, d))
    queue[:, 0] = 0.0
    queue = _unit(queue)
    queue[a] = _unit(np.eye(d)[0] + np.eye(d)[1])
    queue[b] = _unit(np.eye(d)[0] - np.eye(d)[1])
    return queue


def test_queue_nearest_returns_the_argmax_row_lowest_index_on_ties():
    rng = np.random.default_rng(0)
    queue = _queue_with_a_tie(24, 6, a=17, b=5, seed=0)  # the tie: row 5 wins over row 17
    x = rng.normal(size=(9, 6)).astype(np.float32) * 3
    x[0] = 2 * np.eye(6, dtype=np.float32)[0]
    got = queue_nearest(queue, x)
    idx = _nearest_reference(queue, x)
    assert idx[0] == 5
    np.testing.assert_array_equal(got, queue[idx])
    assert len(set(idx.tolist())) > 3  # not one row for everything
    assert not np.any(jax.grad(lambda q: jnp.sum(queue_nearest(q, x)))(queue))  # state: no gradient
    # Cosine, not dot product: a long row does not win by its length.
    long = queue.copy()
    long[9] = 10 * _unit(queue[idx[1]] + 0.5 * queue[9])
    assert x[1] @ long[9] > x[1] @ queue[idx[1]] and _nearest_reference(long, x)[1] == idx[1]
    np.testing.assert_array_equal(queue_nearest(long, x)[1], long[idx[1]])


def test_queue_sharded_over_rows_on_a_mesh_equals_one_device():
    mesh = make_mesh(MESHES["data2_fsdp2_tensor2"])
    rng = np.random.default_rng(1)
    queue = _queue_with_a_tie(40, 6, a=33, b=4, seed=3)  # a tie across shards: rows 4 and 33
    x = rng.normal(size=(16, 6)).astype(np.float32)
    x[3] = np.eye(6, dtype=np.float32)[0]
    rows = NamedSharding(mesh, P(BATCH_AXES, None))
    sharded_queue = jax.device_put(queue, rows)
    assert sharded_queue.sharding.shard_shape(queue.shape) == (10, 6)  # 4 row shards
    x_shard = jax.device_put(x, NamedSharding(mesh, batch_spec(2)))
    got = jax.jit(queue_nearest)(sharded_queue, x_shard)
    want = queue_nearest(queue, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want[3], queue[4])
    np.testing.assert_array_equal(want, queue[_nearest_reference(queue, x)])
    # The push too: a wrapping write into the row-sharded queue.
    state = {"queue": queue, "ptr": jnp.int32(30)}
    sharded = {"queue": sharded_queue, "ptr": jnp.int32(30)}
    got = jax.jit(queue_push, out_shardings={"queue": rows, "ptr": None})(sharded, x_shard)
    want = queue_push(state, x)
    np.testing.assert_allclose(got["queue"], want["queue"], rtol=1e-6)  # jit vs eager normalisation: 1 ulp
    np.testing.assert_array_equal(got["queue"][6:30], queue[6:30])  # the rows not written stay as they were
    assert int(got["ptr"]) == int(want["ptr"]) == 6


def test_declip_step_order_takes_both_neighbours_before_pushing_eda_then_captions():
    """The toolkit's order, spelled with these functions: NN first, then push EDA, then captions."""
    state = queue_init(jax.random.key(0), 8, 4)
    txt, eda = _correlated(2, b=3, d=4, seed=2)
    nn_txt = queue_nearest(state["queue"], txt)
    nn_eda = queue_nearest(state["queue"], eda)
    state = queue_push(queue_push(state, eda), txt)
    np.testing.assert_allclose(state["queue"][:3], eda, rtol=1e-6)
    np.testing.assert_allclose(state["queue"][3:6], txt, rtol=1e-6)
    assert int(state["ptr"]) == 6
    # Neighbours come from the initial random bank, not from this batch.
    initial = np.asarray(queue_init(jax.random.key(0), 8, 4)["queue"])
    for nn in (nn_txt, nn_eda):
        assert all(any(np.array_equal(row, q) for q in initial) for row in np.asarray(nn))


# --- NN InfoNCE and multi-view CLIP ---------------------------------------------------------------


def _nn_reference(images, texts, scale):
    pairs = [
        _ce_rows(scale * img.astype(np.float64) @ txt.astype(np.float64).T) for img in images for txt in texts
    ]
    return np.mean(pairs)


def _clip_reference(img, txt, scale):
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
    return (_ce_rows(logits) + _ce_rows(logits.T)) / 2


def test_nn_loss_is_one_direction_infonce_averaged_over_pairs():
    img1, img2, nn_t, nn_eda = _correlated(4, seed=0)
    loss = nn_loss([img1, img2], [nn_t, nn_eda], 12.0)
    np.testing.assert_allclose(loss, _nn_reference([img1, img2], [nn_t, nn_eda], 12.0), rtol=1e-5)
    # One direction: the text -> image reading differs.
    assert abs(_nn_reference([nn_t], [img1], 12.0) - _nn_reference([img1], [nn_t], 12.0)) > 1e-3
    np.testing.assert_allclose(nn_loss([img1], [nn_t], 12.0), _nn_reference([img1], [nn_t], 12.0), rtol=1e-5)


def test_clip_mvs_averages_the_four_pairs_and_reports_the_first():
    img1, img2, txt, eda = _correlated(4, seed=1)
    loss, metrics = clip_mvs_loss([img1, img2], [txt, eda], 14.0)
    pairs = [_clip_reference(i, t, 14.0) for i in (img1, img2) for t in (txt, eda)]
    assert np.ptp(pairs) > 1e-2  # the four pairs differ, so a wrong average shows
    np.testing.assert_allclose(loss, np.mean(pairs), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], np.mean(pairs), rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_loss_view1"], pairs[0], rtol=1e-5)
    logits = img1.astype(np.float64) @ txt.T
    b = len(img1)
    np.testing.assert_allclose(metrics["i2t_accuracy"], np.mean(np.argmax(logits, 1) == np.arange(b)))
    np.testing.assert_allclose(metrics["t2i_accuracy"], np.mean(np.argmax(logits.T, 1) == np.arange(b)))
    np.testing.assert_allclose(metrics["positive_similarity"], np.mean(np.diag(logits)), rtol=1e-5)
    assert float(metrics["logit_scale"]) == 14.0


def _both_terms(views, texts, nn_texts, scale, mesh=None):
    def f(views, texts, nn_texts, scale):
        mvs, metrics = clip_mvs_loss(views, texts, scale, mesh=mesh)
        nn = nn_loss(views, nn_texts, scale, mesh=mesh)
        return mvs + 0.7 * nn, (mvs, nn, metrics)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(views, texts, nn_texts, scale)


@pytest.mark.parametrize("name", list(MESHES))
def test_nn_and_mvs_losses_and_gradients_on_a_mesh_equal_the_dense_ones(name):
    arrays = _correlated(6, seed=4)
    views, texts, nn_texts = arrays[:2], arrays[2:4], arrays[4:]
    scale = jnp.float32(9.0)
    (_, (mvs, nn, metrics)), grads = _both_terms(views, texts, nn_texts, scale)
    np.testing.assert_allclose(mvs, np.mean([_clip_reference(i, t, 9.0) for i in views for t in texts]), 1e-5)
    np.testing.assert_allclose(nn, _nn_reference(views, nn_texts, 9.0), rtol=1e-5)

    mesh = make_mesh(MESHES[name])
    shard = NamedSharding(mesh, batch_spec(2))
    put = lambda xs: [jax.device_put(x, shard) for x in xs]
    (_, (got_mvs, got_nn, got_metrics)), got_grads = _both_terms(
        put(views), put(texts), put(nn_texts), scale, mesh
    )
    np.testing.assert_allclose(got_mvs, mvs, rtol=1e-5)
    np.testing.assert_allclose(got_nn, nn, rtol=1e-5)
    for key in metrics:
        np.testing.assert_allclose(got_metrics[key], metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert all(np.abs(np.asarray(g)).max() > 1e-3 for g in jax.tree.leaves(grads))  # every input is reached


def test_nn_loss_gradient_on_a_mesh_reaches_every_text_through_the_gather():
    """Only nn_loss, so the text gradients are the gather's transpose alone (no CLIP term mixing in)."""
    views, nn_texts = _correlated(2, seed=5), _correlated(2, seed=6)
    f = lambda mesh: jax.jit(jax.grad(lambda v, t: nn_loss(v, t, 10.0, mesh=mesh), argnums=(0, 1)))
    want = f(None)(views, nn_texts)
    mesh = make_mesh(MESHES["data8"])
    shard = NamedSharding(mesh, batch_spec(2))
    put = lambda xs: [jax.device_put(x, shard) for x in xs]
    got = f(mesh)(put(views), put(nn_texts))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
