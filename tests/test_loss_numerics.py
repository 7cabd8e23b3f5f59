"""The contrastive cross-entropies in float32 (issue 22, item 22).

Every InfoNCE term (CLIP, DeCLIP's multi-view and nearest-neighbour terms,
SLIP's NT-Xent, FILIP's token-wise loss) goes through
`objectives.clip.cross_entropy_sum`, which takes logsumexp(s * (l - l_pos))
with the positive's own term exactly 0, instead of logsumexp(s * l) - s * l_pos,
which cancels in float32: a saturated batch at scale 100 came out at -1.7e-6.

The references are float64 numpy of the same logits. Where the logits can
be chosen exactly (CLIP, DeCLIP NN: image i = e_i, so the similarity matrix
is the text matrix, dyadic entries whose products and sums are exact in
float32), the float32 loss must match to ~1e-7 relative, for a typical batch
(loss ~1) and a nearly saturated one (loss ~1e-3, where the cancellation
costs three digits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from veclip_jax.objectives import clip, declip, filip, slip
from veclip_jax.parallel.mesh import make_mesh

# Jitted (one compile per mesh, not one trace of the shard_map per call); the mesh is static.
clip_loss = jax.jit(clip.clip_loss, static_argnames="mesh")
nn_loss = jax.jit(declip.nn_loss, static_argnames="mesh")
nt_xent_loss = jax.jit(slip.nt_xent_loss, static_argnames="mesh")
filip_loss = jax.jit(filip.filip_loss, static_argnames=("mesh", "top_k"))
filip_logits = jax.jit(filip.filip_logits, static_argnames=("mesh", "top_k"))

B = 64
MESHES = {"one_device": None, "data2_fsdp4": dict(data=2, fsdp=4, tensor=1)}


def _ce64(logits: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per-row CE in float64, accurate however small: log1p of the others' mass past the row max."""
    x = logits.astype(np.float64)
    d = x - x[positive][:, None]
    m = np.max(d, axis=1)
    others = np.where(positive, 0.0, np.exp(d - m[:, None])).sum(axis=1)
    return m + np.log1p(np.expm1(-m) + others)


def _clip64(sims: np.ndarray, scale: float) -> float:
    eye = np.eye(len(sims), dtype=bool)
    return float((_ce64(scale * sims, eye).mean() + _ce64(scale * sims.T, eye).mean()) / 2)


def _dyadic_sims(kind: str, seed: int = 0) -> np.ndarray:
    """[B, B] cosine-like similarities on a 1/64 grid, positives on the diagonal."""
    rng = np.random.default_rng(seed)
    if kind == "typical":  # positives in [0.5, 1], negatives in [0.3, 1]: loss ~1 at scale 100
        sims = rng.integers(19, 65, size=(B, B)) / 64
        np.fill_diagonal(sims, rng.integers(32, 65, size=B) / 64)
    else:  # positives 1, negatives 6/64 .. 1 below: loss ~1e-3 at scale 100
        sims = 1 - rng.integers(6, 65, size=(B, B)) / 64
        np.fill_diagonal(sims, 1.0)
    return sims.astype(np.float32)


def _as_embeddings(sims: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """img = I, txt = sims^T: img @ txt^T = sims exactly (one product per entry)."""
    return jnp.eye(B, dtype=jnp.float32), jnp.asarray(sims.T)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kind", ["typical", "nearly_saturated"])
def test_clip_loss_at_batch_64_scale_100_matches_float64(kind, mesh):
    sims = _dyadic_sims(kind)
    want = _clip64(sims, 100.0)
    assert (want > 0.5) if kind == "typical" else (1e-4 < want < 1e-2)
    m = None if MESHES[mesh] is None else make_mesh(MESHES[mesh])
    got, _ = clip_loss(*_as_embeddings(sims), jnp.float32(100.0), mesh=m)
    assert abs(float(got) - want) <= 1.5e-7 * want, (float(got), want, abs(float(got) - want) / want)


@pytest.mark.parametrize("mesh", MESHES)
def test_a_saturated_batch_gives_a_nonnegative_clip_loss(mesh):
    # Image i = text i (random unit vectors): the positives at cosine 1 (to round-off), the
    # negatives far below. The old form gave -1.7e-6 for seed 0 at scale 100.
    m = None if MESHES[mesh] is None else make_mesh(MESHES[mesh])
    got, want = {}, {}
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(B, 16))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        for scale in (30.0, 100.0):
            got[seed, scale] = float(clip_loss(jnp.asarray(x), jnp.asarray(x), jnp.float32(scale), mesh=m)[0])
            want[seed, scale] = _clip64(x.astype(np.float64) @ x.astype(np.float64).T, scale)
    assert all(v >= 0.0 for v in got.values()), got
    for k, v in got.items():
        # Float32 cosines are off by ~1e-7, i.e. the exponents by ~1e-5 at scale 100.
        assert abs(v - want[k]) <= 1e-4 * want[k], (k, v, want[k])


@pytest.mark.parametrize("kind", ["typical", "nearly_saturated"])
def test_declip_nn_term_at_batch_64_scale_100_matches_float64(kind):
    sims = _dyadic_sims(kind, seed=1)
    img, txt = _as_embeddings(sims)
    want = float(_ce64(100.0 * sims, np.eye(B, dtype=bool)).mean())  # image -> text only
    for mesh in MESHES.values():
        got = nn_loss([img], [txt], 100.0, mesh=None if mesh is None else make_mesh(mesh))
        assert abs(float(got) - want) <= 1.5e-7 * want, (float(got), want)


def _nt_xent64(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    logits = (z @ z.T) / tau
    np.fill_diagonal(logits, -np.inf)  # the anchor itself
    positive = np.zeros_like(logits, dtype=bool)
    positive[np.arange(2 * n), np.concatenate([np.arange(n, 2 * n), np.arange(n)])] = True
    return float(_ce64(logits, positive).mean())


@pytest.mark.parametrize("mesh", MESHES)
def test_slip_nt_xent_is_nonnegative_and_accurate_near_saturation(mesh):
    rng = np.random.default_rng(2)
    z1 = rng.normal(size=(B, 16)).astype(np.float32)
    z2 = (z1 + 0.01 * rng.normal(size=(B, 16))).astype(np.float32)  # views nearly the same
    m = None if MESHES[mesh] is None else make_mesh(MESHES[mesh])
    for tau in (0.1, 0.02):
        got, _ = nt_xent_loss(jnp.asarray(z1), jnp.asarray(z2), tau, mesh=m)
        want = _nt_xent64(z1, z2, tau)
        assert float(got) >= 0.0
        # Float32 cosines (~1e-7) times 1 / tau: the old form was off by ~ulp(1 / tau) per anchor.
        assert abs(float(got) - want) <= 2e-5 * want, (tau, float(got), want)
    saturated, _ = nt_xent_loss(jnp.asarray(z1), jnp.asarray(z1), 0.01, mesh=m)
    assert float(saturated) >= 0.0


@pytest.mark.parametrize("mesh", MESHES)
def test_filip_loss_is_nonnegative_and_accurate_near_saturation(mesh):
    # Each item's tokens are noisy copies of one direction: its own pair scores ~1, others ~0.
    rng = np.random.default_rng(3)
    base = rng.normal(size=(B, 1, 16))
    img = (base + 0.05 * rng.normal(size=(B, 5, 16))).astype(np.float32)
    txt = (base + 0.05 * rng.normal(size=(B, 6, 16))).astype(np.float32)
    valid = np.ones((B, 6), bool)
    valid[:, 4:] = rng.random((B, 2)) < 0.5
    m = None if MESHES[mesh] is None else make_mesh(MESHES[mesh])
    args = (jnp.asarray(img), jnp.asarray(txt), jnp.asarray(valid))
    for scale in (10.0, 30.0):
        i2t, t2i = (np.asarray(x) for x in filip_logits(*args, top_k=3, mesh=m))
        eye = np.eye(B, dtype=bool)
        want = float((_ce64(scale * i2t, eye).mean() + _ce64(scale * t2i, eye).mean()) / 2)
        got, _ = filip_loss(*args, jnp.float32(scale), top_k=3, mesh=m)
        assert float(got) >= 0.0
        # The same float32 logits: only the cross-entropy's own round-off is left.
        assert abs(float(got) - want) <= 1e-6 * want, (scale, float(got), want)
