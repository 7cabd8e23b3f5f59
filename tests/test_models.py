"""The towers: sizes, layout, axis names, pooling, activations."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.special import erf

from tests.helpers import random_batch
from veclip_jax import defaults
from veclip_jax.config import validate_config
from veclip_jax.models.layers import (
    Attention,
    TransformerConfig,
    attention_implementation,
    exact_gelu,
    layer_norm,
    quick_gelu,
)
from veclip_jax.objectives.model import build as build_model
from veclip_jax.objectives.model import init_params, param_count, param_logical_specs
from veclip_jax.parallel.rules import DEFAULT_RULES

# HF transformers' CLIPModel counts (OpenAI vocabulary 49,408, 224 px):
# openai/clip-vit-base-patch16, openai/clip-vit-large-patch14, and
# open_clip's ViT-H-14 (986.11M), whose towers are VeCLIP's H/14.
OPENAI_LAYOUT_COUNTS = {"B/16": 149_620_737, "L/14": 427_616_513, "H/14": 986_109_441}


@pytest.mark.parametrize("size", ["B/16", "L/14", "H/14"])
def test_param_count_matches_known_clip_figures(size):
    cfg = defaults.model_config(size)
    cfg.text.vocab_size = 49408
    cfg.vision.image_size = 224
    assert param_count(build_model(cfg)) == OPENAI_LAYOUT_COUNTS[size]


def test_param_count_of_veclip_sizes_follows_vocab_and_resolution():
    # Same towers with T5's 32,100 ids (and 336 px for H/14): the difference
    # is exactly the token table and the position table.
    b16 = param_count(build_model(defaults.model_config("B/16")))
    assert b16 == OPENAI_LAYOUT_COUNTS["B/16"] - (49408 - 32100) * 512
    h14 = param_count(build_model(defaults.model_config("H/14")))
    extra_positions = (24 * 24 + 1 - (16 * 16 + 1)) * 1280
    assert h14 == OPENAI_LAYOUT_COUNTS["H/14"] - (49408 - 32100) * 1024 + extra_positions


def test_parameter_tree_mirrors_hf_clipmodel_names():
    specs = param_logical_specs(build_model(defaults.model_config("tiny")))
    flat = {"/".join(k) for k in traverse_util.flatten_dict(specs)}
    expected = {
        "logit_scale",
        "visual_projection/kernel",
        "text_projection/kernel",
        "vision_model/embeddings/patch_embedding/kernel",
        "vision_model/embeddings/class_embedding",
        "vision_model/embeddings/position_embedding",
        "vision_model/pre_layrnorm/scale",
        "vision_model/post_layernorm/bias",
        "text_model/embeddings/token_embedding",
        "text_model/embeddings/position_embedding",
        "text_model/final_layer_norm/scale",
    }
    for tower in ("vision_model", "text_model"):
        for leaf in (
            "self_attn/q_proj/kernel",
            "self_attn/out_proj/bias",
            "layer_norm1/scale",
            "layer_norm2/bias",
            "mlp/fc1/kernel",
            "mlp/fc2/bias",
        ):
            expected.add(f"{tower}/encoder/layers/{leaf}")
    assert expected <= flat
    assert not any("bias" in k for k in flat if "projection" in k or "patch_embedding" in k)


def test_every_parameter_has_logical_axis_names_known_to_the_rules():
    model = build_model(defaults.model_config("tiny"))
    specs = param_logical_specs(model)
    shapes = nn.unbox(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
    known = {name for name, _ in DEFAULT_RULES}
    for spec, shape in zip(
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree.leaves(shapes),
        strict=True,
    ):
        assert len(spec) == len(shape.shape)
        assert all(name in known for name in spec), spec


def test_stacked_layers_carry_the_layers_axis():
    specs = param_logical_specs(build_model(defaults.model_config("tiny")))
    q = specs["vision_model"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q) == ("layers", "embed", "heads", "kv")


def _init(config):
    model = build_model(config.model)
    params = jax.jit(lambda r: nn.unbox(init_params(model, r)))(jax.random.key(0))
    return model, params


def _apply(model, params, *inputs, method="__call__"):
    """model.apply, jitted (eager op-by-op dispatch of the scans is slow)."""
    return jax.jit(lambda p, *x: model.apply({"params": p}, *x, method=method))(params, *inputs)


def test_outputs_are_unit_norm_and_scale_is_initial_temperature():
    config = defaults.get_config()
    model, params = _init(config)
    batch = random_batch(config, 4)
    out = _apply(model, params, batch["image"], batch["tokens"])
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, rtol=1e-5)
    assert out["image_embeds"].shape == (4, config.model.embed_dim)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-6)


def test_logit_scale_is_clipped_at_its_maximum():
    config = defaults.get_config()
    model, params = _init(config)
    params = dict(params, logit_scale=jnp.asarray(10.0))
    batch = random_batch(config, 2)
    out = _apply(model, params, batch["image"], batch["tokens"])
    assert float(out["logit_scale"]) == pytest.approx(100.0)


def test_text_is_pooled_at_first_end_of_text_and_ignores_what_follows():
    config = defaults.get_config()
    model, params = _init(config)
    tokens = random_batch(config, 2)["tokens"]
    tokens[:, 5] = config.model.text.eos_id
    other = tokens.copy()
    other[:, 6:] = 7  # anything after the first end-of-text token
    other[:, 9] = config.model.text.eos_id  # even a second end-of-text
    a = _apply(model, params, tokens, method="encode_text")
    b = _apply(model, params, other, method="encode_text")
    np.testing.assert_allclose(a, b, atol=1e-6)
    changed = tokens.copy()
    changed[:, 4] = 8  # a token before it matters
    c = _apply(model, params, changed, method="encode_text")
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4


def test_activations_match_hf_definitions():
    x = jnp.linspace(-4, 4, 101)
    np.testing.assert_allclose(exact_gelu(x), 0.5 * x * (1 + erf(np.asarray(x) / np.sqrt(2))), atol=1e-6)
    np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))), atol=1e-6)


def _layer_norm_epsilons(model_cfg) -> dict[str, float]:
    """'tower/.../name' -> epsilon of every LayerNorm the model runs (recorded while tracing it)."""
    model = build_model(model_cfg)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.LayerNorm) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = context.module.epsilon
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return seen


def test_every_layer_norm_uses_hf_clips_epsilon():
    seen = _layer_norm_epsilons(defaults.get_config().model)
    names = {name.split("/")[0] + "/" + name.split("/")[-1] for name in seen}
    assert names == {
        "vision_model/pre_layrnorm", "vision_model/post_layernorm", "vision_model/layer_norm1",
        "vision_model/layer_norm2", "text_model/layer_norm1", "text_model/layer_norm2",
        "text_model/final_layer_norm",
    }  # fmt: skip
    assert set(seen.values()) == {1e-5}  # HF CLIP's; flax's own default is 1e-6


def test_layer_norm_epsilon_comes_from_the_model_config():
    config = defaults.get_config()
    config.model.layer_norm_eps = 1e-3
    assert set(_layer_norm_epsilons(config.model).values()) == {1e-3}


def test_layer_norm_normalises_with_its_epsilon():
    # Inputs whose variance (1e-6) is below the epsilon: the epsilon sets the output's size.
    x = (1e-3 * np.random.default_rng(0).normal(size=(3, 64))).astype(np.float32)
    cfg = TransformerConfig(width=64, layers=1, heads=1, mlp_dim=64, layer_norm_eps=1e-5)
    ln = layer_norm(cfg, "ln")
    out = np.asarray(ln.apply(nn.unbox(ln.init(jax.random.key(0), x)), x))
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(axis=-1, keepdims=True)

    def numpy_layer_norm(eps):
        return centred / np.sqrt(centred.var(axis=-1, keepdims=True) + eps)

    np.testing.assert_allclose(out, numpy_layer_norm(1e-5), rtol=1e-4, atol=1e-6)
    assert np.abs(numpy_layer_norm(1e-6) - numpy_layer_norm(1e-5)).max() > 0.1  # eps matters here


def test_bfloat16_compute_keeps_float32_parameters():
    config = defaults.get_config()
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
    model, params = _init(config)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    batch = random_batch(config, 2)
    out = _apply(model, params, batch["image"], batch["tokens"])
    assert out["image_embeds"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out["text_embeds"])).all()


def test_wrong_image_size_is_refused():
    config = defaults.get_config()
    model, params = _init(config)
    with pytest.raises(ValueError, match="expects 32px"):
        _apply(model, params, np.zeros((1, 64, 64, 3), np.float32), method="encode_image")


def test_every_remat_policy_gives_the_same_gradients():
    config = defaults.get_config()
    batch = random_batch(config, 4)
    grads = []
    for remat in ("none", "full", "dots", "dots_no_batch"):
        config.model.remat = remat
        model, params = _init(config)

        def loss(p, model=model):
            out = model.apply({"params": p}, batch["image"], batch["tokens"])
            return jnp.sum(out["image_embeds"] * out["text_embeds"])

        grads.append(jax.jit(jax.grad(loss))(params))
    for other in grads[1:]:
        diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), other, grads[0])
        assert max(jax.tree.leaves(diffs)) < 1e-5


def test_attention_implementation_choice():
    # jax's implementation=None is XLA's unfused attention; cuDNN must be named.
    on_gpu = jax.default_backend() == "gpu"
    assert attention_implementation("auto", jnp.bfloat16) == ("cudnn" if on_gpu else None)
    assert attention_implementation("auto", jnp.float16) == ("cudnn" if on_gpu else None)
    assert attention_implementation("auto", jnp.float32) is None  # cuDNN's kernel takes half precision only
    assert attention_implementation("xla", jnp.bfloat16) is None
    assert attention_implementation("cudnn", jnp.float32) == "cudnn"
    config = defaults.get_config()
    config.model.attention = "flash"
    with pytest.raises(ValueError, match="model.attention"):  # refused by the one config check
        validate_config(config)


def _attention(attention: str) -> Attention:
    cfg = TransformerConfig(width=32, layers=1, heads=4, mlp_dim=64, dtype=jnp.bfloat16, attention=attention)
    return Attention(cfg)


def _refusing_cudnn(monkeypatch) -> list:
    """Makes jax.nn.dot_product_attention refuse implementation="cudnn", as cuDNN does for some
    shapes; returns the implementations asked for, in order."""
    real, asked = jax.nn.dot_product_attention, []

    def dot_product_attention(*args, implementation=None, **kwargs):
        asked.append(implementation)
        if implementation == "cudnn":
            raise ValueError("cuDNN does not support this shape (simulated)")
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", dot_product_attention)
    return asked


def test_auto_attention_falls_back_to_xla_when_cudnn_refuses(monkeypatch, caplog):
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    params = nn.unbox(_attention("xla").init(jax.random.key(0), x))
    want = _attention("xla").apply(params, x)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # "auto" in bf16 now asks for cuDNN
    asked = _refusing_cudnn(monkeypatch)
    with caplog.at_level(logging.WARNING):
        got = _attention("auto").apply(params, x)
    assert asked == ["cudnn", None]
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert "cuDNN attention refused (2, 5, 4, 8)" in caplog.text


def test_cudnn_attention_asked_for_by_name_does_not_fall_back(monkeypatch):
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    params = nn.unbox(_attention("xla").init(jax.random.key(0), x))
    asked = _refusing_cudnn(monkeypatch)
    with pytest.raises(ValueError, match="simulated"):
        _attention("cudnn").apply(params, x)
    assert asked == ["cudnn"]
