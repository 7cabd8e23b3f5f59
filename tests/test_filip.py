"""FILIP's late-interaction loss: the numpy formula, padding masking, top-k, the ring on meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from veclip_jax.objectives.filip import filip_logits, filip_loss, select_topk_tokens
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.parallel.rules import batch_spec

MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1),
    "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}
B, N, L, D, TOP_K = 16, 9, 12, 8, 4
SCALE = 6.0  # moderate: every column of a row contributes to the gradient
# Valid caption lengths: several shorter than TOP_K, some with no padding at all.
LENGTHS = np.array([1, 2, 3, 4, 5, 12, 7, 3, 9, 12, 2, 6, 11, 8, 10, 5])


def _inputs(seed=0, lengths=LENGTHS):
    """Unnormalised tokens (text tokens near one of their image's patches), validity, garbage padding."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(B, N, D))
    txt = img[np.arange(B)[:, None], rng.integers(0, N, size=(B, L))] + 1.2 * rng.normal(size=(B, L, D))
    img *= rng.uniform(0.5, 3.0, size=(B, N, 1))  # the loss must normalise per token
    txt *= rng.uniform(0.5, 3.0, size=(B, L, 1))
    valid = np.arange(L)[None, :] < lengths[:, None]
    txt = np.where(valid[..., None], txt, 5.0 * rng.normal(size=(B, L, D)))
    return img.astype(np.float32), txt.astype(np.float32), valid


# -- the formula, written out in float64 ------------------------------------------------------------


def _np_normalise(x, valid=None):
    x = x.astype(np.float64)
    if valid is not None:
        x = np.where(valid[..., None], x, 0.0)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _np_select(img, txt, valid, top_k):
    """Per pair: indices of its kept patches and of its kept VALID text positions (None: keep all)."""
    kept_img, kept_txt = [], []
    for i in range(len(img)):
        sims = img[i] @ txt[i].T  # [N, L]
        cols = np.flatnonzero(valid[i])
        if top_k is None or top_k >= img.shape[1]:
            kept_img.append(np.arange(img.shape[1]))
        else:
            row_sums = sims[:, cols].sum(axis=1)
            kept_img.append(np.argsort(-row_sums, kind="stable")[:top_k])
        if top_k is None or top_k >= txt.shape[1]:
            kept_txt.append(cols)
        else:  # only valid positions compete; a short caption keeps fewer than top_k
            col_sums = sims[:, cols].sum(axis=0)
            kept_txt.append(cols[np.argsort(-col_sums, kind="stable")[:top_k]])
    return kept_img, kept_txt


def _np_logits(img, txt, valid, top_k):
    """i2t, t2i [B, B]: the local side all its (valid) tokens, the remote side its selection."""
    img, txt = _np_normalise(img), _np_normalise(txt, valid)
    kept_img, kept_txt = _np_select(img, txt, valid, top_k)
    n = len(img)
    i2t, t2i = np.zeros((n, n)), np.zeros((n, n))
    for a in range(n):
        own_txt = txt[a][valid[a]]
        for b in range(n):
            i2t[a, b] = np.mean(np.max(img[a] @ txt[b][kept_txt[b]].T, axis=1))
            t2i[a, b] = np.mean(np.max(own_txt @ img[b][kept_img[b]].T, axis=1))
    return i2t, t2i


def _np_filip(img, txt, valid, scale, top_k):
    """FILIP's loss and metrics for the whole batch."""
    i2t, t2i = _np_logits(img, txt, valid, top_k)
    n = len(img)

    def ce(logits):
        z = scale * logits
        zmax = z.max(axis=1, keepdims=True)
        lse = np.log(np.sum(np.exp(z - zmax), axis=1)) + zmax[:, 0]
        return np.mean(lse - np.diag(z))

    return {
        "filip_loss": (ce(i2t) + ce(t2i)) / 2,
        "filip_i2t_accuracy": np.mean(np.argmax(i2t, axis=1) == np.arange(n)),
        "filip_t2i_accuracy": np.mean(np.argmax(t2i, axis=1) == np.arange(n)),
    }


def _toolkit_filip(img, txt, scale, top_k):
    """DeCLIP's version: no validity mask, so padding is selected, maxed over and averaged."""
    return _np_filip(img, txt, np.ones(txt.shape[:2], bool), scale, top_k)


# -- tests ------------------------------------------------------------------------------------------


def test_dense_loss_and_metrics_match_numpy_formula():
    img, txt, valid = _inputs()
    loss, metrics = jax.jit(lambda i, t, v: filip_loss(i, t, v, SCALE, top_k=TOP_K))(img, txt, valid)
    ref = _np_filip(img, txt, valid, SCALE, TOP_K)
    for got, want in zip(
        filip_logits(img, txt, valid, top_k=TOP_K), _np_logits(img, txt, valid, TOP_K), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, ref["filip_loss"], rtol=1e-6)
    for name, value in ref.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)
    assert sorted(metrics) == sorted(ref)
    # The inputs are informative: accuracies are neither 0 nor 1, and the selection matters.
    assert 0 < ref["filip_i2t_accuracy"] < 1 and 0 < ref["filip_t2i_accuracy"] < 1
    assert abs(_np_filip(img, txt, valid, SCALE, None)["filip_loss"] - ref["filip_loss"]) > 1e-3


def test_selection_keeps_each_pairs_top_tokens_and_marks_short_captions():
    img, txt, valid = _inputs(seed=3)
    nimg, ntxt = _np_normalise(img), _np_normalise(txt, valid)
    sel_img, sel_txt, sel_valid = jax.jit(select_topk_tokens, static_argnums=3)(
        jnp.asarray(nimg, jnp.float32), jnp.asarray(ntxt, jnp.float32), valid, TOP_K
    )
    assert sel_img.shape == (B, TOP_K, D) and sel_txt.shape == (B, TOP_K, D)
    kept_img, kept_txt = _np_select(nimg, ntxt, valid, TOP_K)
    for i in range(B):
        np.testing.assert_allclose(sel_img[i], nimg[i][kept_img[i]], atol=1e-6)
        k = len(kept_txt[i])
        assert k == min(TOP_K, LENGTHS[i])
        np.testing.assert_array_equal(sel_valid[i], np.arange(TOP_K) < k)
        np.testing.assert_allclose(sel_txt[i][:k], ntxt[i][kept_txt[i]], atol=1e-6)


def _value_and_grads(img, txt, valid, scale=SCALE, top_k=TOP_K, mesh=None):
    def f(i, t, s, v):
        return filip_loss(i, t, v, s, top_k=top_k, mesh=mesh)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
        img, txt, jnp.float32(scale), valid
    )


def test_gradient_matches_finite_differences_of_the_formula():
    """The gradient flows through the selected features (and the scale); the choice itself is fixed."""
    img, txt, valid = _inputs(seed=1)
    _, (g_img, g_txt, g_scale) = _value_and_grads(img, txt, valid)
    rng = np.random.default_rng(7)
    d_img, d_txt = rng.normal(size=img.shape), rng.normal(size=txt.shape)
    d_scale, eps = 0.7, 1e-6

    def at(t):
        return _np_filip(img + t * d_img, txt + t * d_txt, valid, SCALE + t * d_scale, TOP_K)["filip_loss"]

    numeric = (at(eps) - at(-eps)) / (2 * eps)
    analytic = np.sum(g_img * d_img) + np.sum(g_txt * d_txt) + g_scale * d_scale
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4)
    # Each part on its own (a gradient lost on one side would hide in the sum).
    for part, grad, direction in (("img", g_img, d_img), ("txt", g_txt, d_txt)):
        d_i, d_t = (direction, 0 * d_txt) if part == "img" else (0 * d_img, direction)
        fd = (
            _np_filip(img + eps * d_i, txt + eps * d_t, valid, SCALE, TOP_K)["filip_loss"]
            - _np_filip(img - eps * d_i, txt - eps * d_t, valid, SCALE, TOP_K)["filip_loss"]
        ) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad * direction), fd, rtol=1e-4, err_msg=part)


def test_padding_changes_nothing_unlike_the_toolkit():
    img, txt, valid = _inputs(seed=2)
    rng = np.random.default_rng(11)
    other = np.where(valid[..., None], txt, 50.0 * rng.normal(size=txt.shape)).astype(np.float32)
    (loss, metrics), grads = _value_and_grads(img, txt, valid)
    assert np.all(grads[1][~valid] == 0)  # no gradient reaches a padded position
    for padding in (other, np.where(valid[..., None], txt, np.nan).astype(np.float32)):  # even NaN
        (loss2, metrics2), grads2 = _value_and_grads(img, padding, valid)
        assert float(loss) == float(loss2)
        for name in metrics:
            assert float(metrics[name]) == float(metrics2[name]), name
        for g, g2 in zip(grads, grads2, strict=True):
            np.testing.assert_array_equal(g, g2)
    # DeCLIP's unmasked loss reads the padding (DeCLIP issue #31).
    toolkit = [_toolkit_filip(img, t, SCALE, TOP_K)["filip_loss"] for t in (txt, other)]
    assert abs(toolkit[0] - toolkit[1]) > 1e-3


def test_top_k_at_least_the_token_counts_is_no_selection():
    img, txt, valid = _inputs(seed=4)
    no_selection = _np_filip(img, txt, valid, SCALE, None)["filip_loss"]
    for top_k in (max(N, L), 100):
        loss, _ = filip_loss(img, txt, valid, SCALE, top_k=top_k)
        np.testing.assert_allclose(loss, no_selection, rtol=1e-6, err_msg=str(top_k))
    # Between the two counts: all patches kept, the text still selected.
    loss, _ = filip_loss(img, txt, valid, SCALE, top_k=N + 1)
    np.testing.assert_allclose(loss, _np_filip(img, txt, valid, SCALE, N + 1)["filip_loss"], rtol=1e-6)
    assert abs(float(loss) - no_selection) > 1e-3
    with pytest.raises(ValueError, match="top_k=0"):
        filip_loss(img, txt, valid, SCALE, top_k=0)


@pytest.fixture(scope="module")
def dense_reference():
    img, txt, valid = _inputs(seed=5)
    return (img, txt, valid), _value_and_grads(img, txt, valid)


@pytest.mark.parametrize("name", list(MESHES))
def test_ring_loss_and_gradients_equal_the_dense_ones(dense_reference, name):
    (img, txt, valid), ((dense, dense_m), dense_g) = dense_reference
    mesh = make_mesh(MESHES[name])

    def put(x):
        return jax.device_put(x, NamedSharding(mesh, batch_spec(x.ndim)))

    (ring, ring_m), ring_g = _value_and_grads(put(img), put(txt), put(valid), mesh=mesh)
    np.testing.assert_allclose(ring, dense, rtol=1e-6)
    for key in dense_m:
        np.testing.assert_allclose(ring_m[key], dense_m[key], rtol=1e-6, err_msg=key)
    for part, g_ring, g_dense in zip(("image", "text", "scale"), ring_g, dense_g, strict=True):
        np.testing.assert_allclose(g_ring, g_dense, rtol=1e-5, atol=1e-8, err_msg=part)
    np.testing.assert_allclose(ring, _np_filip(img, txt, valid, SCALE, TOP_K)["filip_loss"], rtol=1e-6)
    # Every hop's block lands in the columns of the items it came from (the loss alone cannot tell).
    rows = jax.jit(lambda i, t, v: filip_logits(i, t, v, top_k=TOP_K, mesh=mesh))(
        put(img), put(txt), put(valid)
    )
    for got, want in zip(rows, _np_logits(img, txt, valid, TOP_K), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _shapes_in(jaxpr, out):
    """Every intermediate shape of a jaxpr, its sub-jaxprs (scan, remat, pjit, ...) included."""
    for eqn in jaxpr.eqns:
        out.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _shapes_in(inner, out)
    return out


def test_ring_never_holds_a_devices_full_rows_of_token_scores():
    """Forward and backward, a device holds one hop's [b, B/n, ., k] scores, never [b, B, N, k]."""
    img, txt, valid = _inputs()
    mesh = make_mesh(MESHES["data8"])
    grad = jax.grad(lambda i, t, s: filip_loss(i, t, valid, s, top_k=TOP_K, mesh=mesh)[0], argnums=(0, 1, 2))
    program = jax.make_jaxpr(grad)(img, txt, jnp.float32(SCALE)).jaxpr
    bodies = [e.params["jaxpr"] for e in program.eqns if e.primitive.name == "shard_map"]
    assert bodies, "the mesh path runs under shard_map"
    shapes = [s for body in bodies for s in _shapes_in(getattr(body, "jaxpr", body), [])]
    b = B // 8
    assert (b, B // 8, L, TOP_K) in shapes  # one hop's text-to-image scores
    full_rows = b * B * N * TOP_K
    assert max(int(np.prod(s)) for s in shapes) < full_rows, sorted(shapes, key=np.prod)[-3:]
