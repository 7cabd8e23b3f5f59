"""Images leave the host as uint8; the model normalises them inside its jitted computation (issue 25).

The guarantee: the same numbers as the float path it replaced, in which the host normalised each
image to float32 (`_old_host_normalize` / `_old_eval_normalize` below, the removed code verbatim) and
the towers took it as it was. "The old model" is today's with `normalize_pixels` replaced by the
identity (what the towers did with a host-normalised float32 batch: cast to the compute dtype).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from tests.helpers import tiny_config
from veclip_jax import batch as batch_schema
from veclip_jax import defaults
from veclip_jax.data import image_ops
from veclip_jax.models import clip as clip_module
from veclip_jax.models.clip import build_model, normalize_pixels
from veclip_jax.objectives import make_objective
from veclip_jax.objectives.model import apply_outputs, build, init_variables
from veclip_jax.parallel.mesh import global_batch, make_mesh, replicated
from veclip_jax.run.inference import Encoders
from veclip_jax.train.assembly import assemble
from veclip_jax.train.resume import check_saved_config

# --- the removed host code, kept as the reference --------------------------------------------------
_MEAN_255 = np.asarray(image_ops.CLIP_MEAN, np.float32) * 255.0
_INV_STD_255 = 1.0 / (np.asarray(image_ops.CLIP_STD, np.float32) * 255.0)


def _old_host_normalize(image: np.ndarray) -> np.ndarray:
    """data/image_ops.normalize before issue 25: the training pipeline's, views' and Encoders.images'."""
    out = image.astype(np.float32)
    out -= _MEAN_255
    out *= _INV_STD_255
    return out


def _old_eval_normalize(arr: np.ndarray, mean=image_ops.CLIP_MEAN, std=image_ops.CLIP_STD) -> np.ndarray:
    """EvalPreprocess.__call__'s tail before issue 25 (a division, with the model's mean/std)."""
    arr = arr.astype(np.float32)
    return (arr - np.asarray(mean, np.float32) * 255.0) / (np.asarray(std, np.float32) * 255.0)


@pytest.fixture
def old_model(monkeypatch):
    """Within the test: the towers take their input as it is (the host-normalised float path)."""

    def install():
        monkeypatch.setattr(clip_module, "normalize_pixels", lambda images, mean, std: images)

    return install


def _pixels(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _tokens(config, b, seed=1) -> np.ndarray:
    t = config.model.text
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, t.vocab_size, size=(b, t.context_length)).astype(np.int32)
    tokens[:, -1] = t.eos_id
    return tokens


# --- the schema and the statistics ------------------------------------------------------------------


def test_images_travel_as_uint8_a_quarter_of_the_bytes():
    assert batch_schema.FIELDS["image"].dtype == "uint8" and batch_schema.FIELDS["views"].dtype == "uint8"
    dims = batch_schema.Dims(224, 77, 2)
    ((shape, dtype),) = [batch_schema.shapes(("image", "tokens"), 256, dims)["image"]]
    assert np.dtype(dtype).itemsize * np.prod(shape) == 256 * 224 * 224 * 3  # float32 was 4x


def test_the_default_statistics_are_clips():
    cfg = defaults.model_config("B/16")
    assert tuple(cfg.vision.image_mean) == image_ops.CLIP_MEAN == defaults.CLIP_MEAN
    assert tuple(cfg.vision.image_std) == image_ops.CLIP_STD == defaults.CLIP_STD
    towers = build_model(cfg)
    assert (towers.image_mean, towers.image_std) == (image_ops.CLIP_MEAN, image_ops.CLIP_STD)


def test_a_model_config_saved_before_the_fields_builds_and_resumes_with_clips():
    config = tiny_config()
    saved = config.to_dict()
    for k in ("image_mean", "image_std"):
        del saved["model"]["vision"][k]
    old = ml_collections.ConfigDict(saved)
    towers = build_model(old.model)
    assert (towers.image_mean, towers.image_std) == (image_ops.CLIP_MEAN, image_ops.CLIP_STD)
    check_saved_config(config, {"config": saved}, step=3)  # not a change of the towers: no refusal


def test_in_jit_normalisation_is_the_old_host_arithmetic_to_the_bit():
    x = _pixels((4, 16, 16, 3))
    got = np.asarray(
        jax.jit(normalize_pixels, static_argnums=(1, 2))(x, image_ops.CLIP_MEAN, image_ops.CLIP_STD)
    )
    np.testing.assert_array_equal(got, _old_host_normalize(x))
    np.testing.assert_array_equal(image_ops.normalize(x), _old_host_normalize(x))  # the kept reference
    # Float pixels (VeCLIP's unrounded bilinear resize) take the same arithmetic.
    f = x.astype(np.float32) + 0.25
    np.testing.assert_array_equal(np.asarray(jax.jit(normalize_pixels, static_argnums=(1, 2))(
        f, image_ops.CLIP_MEAN, image_ops.CLIP_STD)), _old_host_normalize(f))  # fmt: skip
    # The old evaluation divided; the multiplication by the reciprocal differs by float32 rounding.
    np.testing.assert_allclose(got, _old_eval_normalize(x), rtol=0, atol=4e-7)


# --- the train step ------------------------------------------------------------------------------


CASES = {
    "vit_f32": dict(size="tiny", dtype="float32", objective="clip"),
    "vit_bf16": dict(size="tiny", dtype="bfloat16", objective="clip"),
    "resnet": dict(size="RN-tiny", dtype="float32", objective="clip"),
    "slip_views": dict(size="tiny", dtype="float32", objective="slip"),
}


def _case_config(case):
    config = tiny_config()
    config.model = defaults.model_config(case["size"])
    config.model.dtype = case["dtype"]
    config.objective.name = case["objective"]
    if case["size"] == "RN-tiny":
        config.model.text.vocab_size = 1024
    return config


def _loss_and_grads(config, params, model_state, batch):
    """What the train step differentiates (train/step.py grads_full_batch's loss_fn), on one device."""
    objective = make_objective(config.objective)
    model = build(config.model, objective)
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    state = objective.init_state(jax.random.key(1), model.dims)

    @jax.jit
    def f(p, batch):
        def loss_fn(p):
            out, _ = apply_outputs(model, p, model_state, batch)
            return objective(out, batch, mesh=mesh, state=state)[0]

        return jax.value_and_grad(loss_fn)(p)

    with jax.set_mesh(mesh):
        return jax.device_get(f(params, batch))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet", "vit_bf16") else n for n in CASES]
)  # the ResNet takes its pixels through the same CLIP._vision as the ViT, and bf16 casts after the same
# float32 normalisation: proven in CI by the others (CI time), in full by the slow suite
def test_train_loss_and_gradients_on_uint8_equal_the_host_normalised_float_path(name, old_model):
    config = _case_config(CASES[name])
    objective = make_objective(config.objective)
    model = build(config.model, objective)
    params, model_state = init_variables(model, jax.random.key(0))
    params = jax.device_get(params)
    b, s = 4, config.model.vision.image_size
    u8 = {"image": _pixels((b, s, s, 3)), "tokens": _tokens(config, b)}
    if "views" in objective.inputs:
        u8["views"] = _pixels((b, objective.views, s, s, 3), seed=2)
    u8 = {k: v for k, v in u8.items() if k in objective.inputs}
    new_loss, new_grads = _loss_and_grads(config, params, model_state, u8)
    old_model()
    old = {k: (_old_host_normalize(v) if v.dtype == np.uint8 else v) for k, v in u8.items()}
    old_loss, old_grads = _loss_and_grads(config, params, model_state, old)
    np.testing.assert_allclose(new_loss, old_loss, rtol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-7) if config.model.dtype == "float32" else dict(rtol=2e-2, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), new_grads, old_grads)


def test_the_compiled_train_step_on_uint8_equals_the_float_path(old_model):
    """The whole step (loss, gradient norm, updated parameters) on a sharded batch."""
    config = tiny_config()
    mesh = make_mesh(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2])
    s = config.model.vision.image_size
    host = {"image": _pixels((8, s, s, 3)), "tokens": _tokens(config, 8)}

    def run(batch):
        a = assemble(config, mesh)
        assert a.abstract_batch()["image"].dtype == np.uint8  # the compile target's dtype too
        state, metrics = a.step(a.init_state(jax.random.key(0)), global_batch(mesh, batch))
        return jax.device_get((metrics["loss"], metrics["grad_norm"], state.params))

    new = run(host)
    old_model()
    old = run(dict(host, image=_old_host_normalize(host["image"])))
    np.testing.assert_allclose(new[0], old[0], rtol=1e-6)
    np.testing.assert_allclose(new[1], old[1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new[2], old[2])


# --- evaluation and veclip_jax.load's encoders ------------------------------------------------------


def _encoders(config):
    model = build(config.model)
    params, _ = init_variables(model, jax.random.key(0))
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    params = jax.device_put(params, jax.tree.map(lambda _: replicated(mesh), params))
    return Encoders(model, mesh, jax.tree.map(lambda _: replicated(mesh), params), 4), params


@pytest.mark.parametrize("stats", ["clip", "own"])
def test_encoders_images_on_uint8_equal_the_old_float_result(stats, old_model):
    config = tiny_config()
    mean, std = image_ops.CLIP_MEAN, image_ops.CLIP_STD
    if stats == "own":  # an imported HF / open_clip model's preprocessor statistics
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        config.model.vision.image_mean, config.model.vision.image_std = mean, std
    s = config.model.vision.image_size
    raw = _pixels((6, 40, 50, 3), seed=3)
    bicubic, tf = image_ops.EvalPreprocess(s, s), image_ops.EvalPreprocess(s, s, "tf_bilinear")
    u8 = np.stack([bicubic(im) for im in raw])
    fl = np.stack([tf(im) for im in raw])
    assert u8.dtype == np.uint8 and fl.dtype == np.float32 and fl.max() <= 255  # pixels, not normalised
    enc, params = _encoders(config)
    new_u8, new_fl = enc.images(params, u8), enc.images(params, fl)
    old_model()
    enc, params = _encoders(config)
    # Encoders.images normalised uint8 on the host (CLIP's); evaluation's EvalPreprocess with its own.
    if stats == "clip":
        np.testing.assert_allclose(new_u8, enc.images(params, _old_host_normalize(u8)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(new_u8, enc.images(params, _old_eval_normalize(u8, mean, std)), atol=2e-6)
    np.testing.assert_allclose(new_fl, enc.images(params, _old_eval_normalize(fl, mean, std)), atol=2e-6)


def test_image_ops_normalize_takes_a_models_statistics():
    x = _pixels((3, 5, 3))
    np.testing.assert_allclose(image_ops.normalize(x, (0.5,) * 3, (0.25,) * 3),
                               (x / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)  # fmt: skip
    got = jax.jit(normalize_pixels, static_argnums=(1, 2))(x, (0.5,) * 3, (0.25,) * 3)
    np.testing.assert_array_equal(np.asarray(got), image_ops.normalize(x, (0.5,) * 3, (0.25,) * 3))
