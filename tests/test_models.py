"""The towers: sizes, layout, axis names, pooling, activations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.special import erf

from configs import base
from tests.helpers import random_batch
from veclip_jax.models.clip import build_model, dummy_inputs
from veclip_jax.models.layers import attention_implementation, exact_gelu, quick_gelu
from veclip_jax.parallel.rules import DEFAULT_RULES
from veclip_jax.train.state import param_count, param_logical_specs

# HF transformers' CLIPModel counts (OpenAI vocabulary 49,408, 224 px):
# openai/clip-vit-base-patch16, openai/clip-vit-large-patch14, and
# open_clip's ViT-H-14 (986.11M), whose towers are VeCLIP's H/14.
OPENAI_LAYOUT_COUNTS = {"B/16": 149_620_737, "L/14": 427_616_513, "H/14": 986_109_441}


@pytest.mark.parametrize("size", ["B/16", "L/14", "H/14"])
def test_param_count_matches_known_clip_figures(size):
    cfg = base.model_config(size)
    cfg.text.vocab_size = 49408
    cfg.vision.image_size = 224
    assert param_count(build_model(cfg)) == OPENAI_LAYOUT_COUNTS[size]


def test_param_count_of_veclip_sizes_follows_vocab_and_resolution():
    # Same towers with T5's 32,100 ids (and 336 px for H/14): the difference
    # is exactly the token table and the position table.
    b16 = param_count(build_model(base.model_config("B/16")))
    assert b16 == OPENAI_LAYOUT_COUNTS["B/16"] - (49408 - 32100) * 512
    h14 = param_count(build_model(base.model_config("H/14")))
    extra_positions = (24 * 24 + 1 - (16 * 16 + 1)) * 1280
    assert h14 == OPENAI_LAYOUT_COUNTS["H/14"] - (49408 - 32100) * 1024 + extra_positions


def test_parameter_tree_mirrors_hf_clipmodel_names():
    specs = param_logical_specs(build_model(base.model_config("tiny")))
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
    model = build_model(base.model_config("tiny"))
    specs = param_logical_specs(model)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model))["params"]))
    known = {name for name, _ in DEFAULT_RULES}
    for spec, shape in zip(
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree.leaves(shapes),
        strict=True,
    ):
        assert len(spec) == len(shape.shape)
        assert all(name in known for name in spec), spec


def test_stacked_layers_carry_the_layers_axis():
    specs = param_logical_specs(build_model(base.model_config("tiny")))
    q = specs["vision_model"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q) == ("layers", "embed", "heads", "kv")


def _init(config):
    model = build_model(config.model)
    params = jax.jit(lambda r: nn.unbox(model.init(r, *dummy_inputs(model))["params"]))(jax.random.key(0))
    return model, params


def _apply(model, params, *inputs, method="__call__"):
    """model.apply, jitted (eager op-by-op dispatch of the scans is slow)."""
    return jax.jit(lambda p, *x: model.apply({"params": p}, *x, method=method))(params, *inputs)


def test_outputs_are_unit_norm_and_scale_is_initial_temperature():
    config = base.get_config()
    model, params = _init(config)
    batch = random_batch(config, 4)
    out = _apply(model, params, batch["image"], batch["tokens"])
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, rtol=1e-5)
    assert out["image_embeds"].shape == (4, config.model.embed_dim)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-6)


def test_logit_scale_is_clipped_at_its_maximum():
    config = base.get_config()
    model, params = _init(config)
    params = dict(params, logit_scale=jnp.asarray(10.0))
    batch = random_batch(config, 2)
    out = _apply(model, params, batch["image"], batch["tokens"])
    assert float(out["logit_scale"]) == pytest.approx(100.0)


def test_text_is_pooled_at_first_end_of_text_and_ignores_what_follows():
    config = base.get_config()
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


def test_layer_norm_epsilon_is_hf_clip_value():
    config = base.get_config()
    assert build_model(config.model).vision.layer_norm_eps == 1e-5


def test_bfloat16_compute_keeps_float32_parameters():
    config = base.get_config()
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
    model, params = _init(config)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    batch = random_batch(config, 2)
    out = _apply(model, params, batch["image"], batch["tokens"])
    assert out["image_embeds"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out["text_embeds"])).all()


def test_wrong_image_size_is_refused():
    config = base.get_config()
    model, params = _init(config)
    with pytest.raises(ValueError, match="expects 32px"):
        _apply(model, params, np.zeros((1, 64, 64, 3), np.float32), method="encode_image")


def test_every_remat_policy_gives_the_same_gradients():
    config = base.get_config()
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
    assert attention_implementation("auto", jnp.bfloat16) is None  # this is a CPU
    assert attention_implementation("xla", jnp.bfloat16) is None
    assert attention_implementation("cudnn", jnp.float32) == "cudnn"
    config = base.get_config()
    config.model.attention = "flash"
    with pytest.raises(ValueError, match="model.attention"):
        build_model(config.model)
