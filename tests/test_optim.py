"""Optimizer: weight-decay mask, schedule corners, clipping, AdamW settings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from veclip_jax import defaults
from veclip_jax.objectives.model import build, init_params
from veclip_jax.train.optim import decay_mask, learning_rate_schedule, make_optimizer


def _tiny_params():
    model = build(defaults.model_config("tiny"))
    return nn.unbox(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))


def test_weight_decay_mask_excludes_biases_norms_class_token_positions_and_scale():
    mask = {"/".join(k): v for k, v in traverse_util.flatten_dict(decay_mask(_tiny_params())).items()}
    no_decay = {k for k, v in mask.items() if not v}
    decay = {k for k, v in mask.items() if v}
    assert "logit_scale" in no_decay
    assert "vision_model/embeddings/class_embedding" in no_decay
    assert "vision_model/embeddings/position_embedding" in no_decay
    assert "text_model/embeddings/position_embedding" in no_decay
    assert "vision_model/pre_layrnorm/scale" in no_decay
    assert "text_model/encoder/layers/layer_norm1/bias" in no_decay
    assert "text_model/encoder/layers/mlp/fc1/bias" in no_decay
    assert all(k.endswith(("bias", "scale", "embedding")) or k == "logit_scale" for k in no_decay)
    assert decay == {k for k in mask if k.endswith("kernel") or k == "text_model/embeddings/token_embedding"}
    assert "vision_model/embeddings/patch_embedding/kernel" in decay
    assert "visual_projection/kernel" in decay


def test_decay_applies_to_kernels_only_in_an_update():
    cfg = defaults.get_config().optim
    cfg.warmup_steps = 0
    cfg.grad_clip_norm = 0.0
    params = {"w": {"kernel": jnp.ones((2, 2))}, "ln": {"scale": jnp.ones(2)}, "logit_scale": jnp.ones(())}
    tx = make_optimizer(cfg, total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    lr = cfg.learning_rate
    np.testing.assert_allclose(updates["w"]["kernel"], -lr * cfg.weight_decay * np.ones((2, 2)), rtol=1e-6)
    assert float(jnp.abs(updates["ln"]["scale"]).max()) == 0
    assert float(jnp.abs(updates["logit_scale"])) == 0


def test_schedule_corners():
    cfg = defaults.get_config().optim
    cfg.learning_rate, cfg.warmup_steps, cfg.end_lr_ratio = 1e-3, 10, 0.1
    lr = learning_rate_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    # Halfway through the cosine: floor + (peak - floor) / 2.
    assert float(lr(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)
    assert float(lr(110)) == pytest.approx(1e-4)
    assert float(lr(500)) == pytest.approx(1e-4)


def test_warmup_longer_than_training_is_refused():
    cfg = defaults.get_config().optim
    cfg.warmup_steps = 100
    with pytest.raises(ValueError, match="warmup_steps"):
        learning_rate_schedule(cfg, total_steps=100)


def test_global_norm_clipping_rescales_gradients_before_adam():
    cfg = defaults.get_config().optim
    # eps = 1 makes Adam's step depend on the gradient's scale, so clipping shows.
    cfg.update(warmup_steps=0, grad_clip_norm=1.0, weight_decay=0.0, eps=1.0)
    params = {"w": {"kernel": jnp.zeros(4)}}
    grads = {"w": {"kernel": jnp.array([300.0, -400.0, 0.0, 0.0])}}  # global norm 500
    clipped = make_optimizer(cfg, total_steps=10)
    got, _ = clipped.update(grads, clipped.init(params), params)
    cfg.grad_clip_norm = 0.0
    plain = make_optimizer(cfg, total_steps=10)
    want, _ = plain.update(jax.tree.map(lambda g: g / 500.0, grads), plain.init(params), params)
    unclipped, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_allclose(got["w"]["kernel"], want["w"]["kernel"], rtol=1e-6)
    assert not np.allclose(got["w"]["kernel"], unclipped["w"]["kernel"], rtol=1e-2)
