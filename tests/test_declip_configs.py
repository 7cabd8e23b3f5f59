"""The DeCLIP toolkit's YFCC-15M configs: the recipe's numbers, the warm-up start, the :local variants."""

import importlib

import numpy as np
import pytest

from veclip_jax.config import ConfigError, validate_config
from veclip_jax.recipes import declip as recipes_declip
from veclip_jax.train.optim import learning_rate_schedule

OBJECTIVES = sorted(recipes_declip.RECIPES)


def _config(objective: str, arg: str | None = None):
    module = importlib.import_module(f"configs.yfcc15m_{objective}_vitb32")
    return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_toolkit_recipe(objective):
    c = _config(objective)
    assert c.objective.name == objective
    assert (c.model.size, c.model.vision.patch_size, c.model.vision.image_size) == ("B/32", 32, 224)
    embed = 768 if objective == "filip" else 512  # the toolkit's FILIP config: embed_dim 768
    assert (c.model.text.layers, c.model.text.width, c.model.text.heads, c.model.embed_dim) == (
        12,
        512,
        8,
        embed,
    )
    assert (c.batch_size, c.total_steps, c.optim.warmup_steps) == (4096, 128_001, 2500)
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.warmup_init_lr) == (0.9, 0.98, 1e-8, 1e-4)
    assert tuple(c.data.crop_scale) == (0.5, 1.0) and c.data.vecap_prob == 0.0
    # The toolkit's optimizers (OBJECTIVES.md A.3-A.6); SigLIP borrows DeCLIP's.
    peak, wd = {
        "clip": (5e-4, 0.5),
        "siglip": (1e-3, 0.1),
        "slip": (5e-4, 0.5),
        "declip": (1e-3, 0.1),
        "filip": (5e-4, 0.5),
        "defilip": (1e-3, 0.1),
    }[objective]
    assert (c.optim.learning_rate, c.optim.weight_decay) == (peak, wd)
    # The views each objective reads, and the toolkit's MoCoV2 augmentation for them.
    views = {"slip": 2, "declip": 2, "filip": 1, "defilip": 2}.get(objective)
    if views:
        a = c.data.augment
        assert a.views == views and tuple(a.view_crop_scale) == (0.2, 1.0)
        assert tuple(a.color_jitter) == (0.4, 0.4, 0.4, 0.1) and a.color_jitter_prob == 0.8
        assert (a.grayscale_prob, a.blur_prob, a.flip_prob) == (0.2, 0.5, 0.5)
        assert tuple(a.blur_sigma) == (0.1, 2.0)
    if objective in ("declip", "defilip"):
        o = c.objective[objective]
        assert (o.clip_weight, o.simsiam_weight, o.mlm_weight, o.nn_weight) == (0.4, 0.2, 0.2, 0.2)
        assert o.queue_size == 65_536 and c.data.augment.mlm_prob == 0.15
    if objective == "defilip":
        assert c.objective.defilip.filip_weight == 0.2
    if objective in ("filip", "defilip"):
        assert (c.objective[objective].top_k, c.objective[objective].token_dim) == (16, 256)
    if objective == "filip":
        assert (c.objective.filip.dense_weight, c.objective.filip.clip_weight) == (1.0, 0.0)
    if objective == "slip":
        o = c.objective.slip
        assert (o.clip_weight, o.ssl_weight, o.ssl_temperature) == (1.0, 1.0, 0.1)
        assert (o.mlp_dim, o.ssl_dim) == (4096, 256)


def test_the_docstrings_state_the_reported_result_and_the_recipe_source():
    reported = {"clip": 32.8, "slip": 34.3, "filip": 39.5, "declip": 43.2, "defilip": 45.0}  # A.7
    for objective, top1 in reported.items():
        doc = importlib.import_module(f"configs.yfcc15m_{objective}_vitb32").__doc__
        assert f"{top1}" in doc and recipes_declip.RECIPES[objective][2] == top1
    siglip = importlib.import_module("configs.yfcc15m_siglip_vitb32").__doc__
    assert "Recipe source" in siglip and "adapted" in siglip
    assert recipes_declip.RECIPES["siglip"][2] is None


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_without_its_corpus_the_config_is_refused_and_with_it_is_valid(objective):
    c = _config(objective)
    with pytest.raises(ConfigError, match="data"):
        validate_config(c, num_devices=8)
    c.data.train_files = "/data/yfcc15m/train-*.array_record"
    c.data.tokenizer = "/data/t5/spiece.model"
    validate_config(c, num_devices=8)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_local_variant_keeps_the_objective_on_the_demo_data(objective):
    c = _config(objective, "local")
    validate_config(c, num_devices=8)
    assert c.objective.name == objective and c.model.size == "tiny" and c.data.allow_demo


def test_warm_up_starts_from_warmup_init_lr():
    c = _config("clip")
    lr = learning_rate_schedule(c.optim, c.total_steps)
    np.testing.assert_allclose(
        [lr(0), lr(1250), lr(2500)], [1e-4, 1e-4 + 0.5 * (5e-4 - 1e-4), 5e-4], rtol=1e-5
    )
    c.optim.warmup_init_lr = 1e-3  # above the peak of 5e-4
    with pytest.raises(ConfigError, match=r"config\.optim\.warmup_init_lr=0\.001"):
        validate_config(c, num_devices=8)


R50 = sorted(recipes_declip.RECIPES_R50)


def _r50(objective: str, arg: str | None = None):
    module = importlib.import_module(f"configs.yfcc15m_{objective}_r50")
    return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("objective", R50)
def test_the_toolkit_rn50_recipe(objective):
    """RESNET.md: CLIP's ModifiedResNet-50, the toolkit's CLIP RN50 optimizer, CLIP's BPE + mask token."""
    c = _r50(objective)
    assert c.objective.name == objective
    v = c.model.vision
    assert (c.model.size, v.type, tuple(v.resnet_layers), v.width, v.heads, v.image_size) == (
        "RN50", "resnet", (3, 4, 6, 3), 64, 32, 224,
    )  # fmt: skip
    assert (c.model.embed_dim, c.model.text.width, c.model.text.layers, c.model.text.heads) == (
        1024,
        512,
        12,
        8,
    )
    assert (c.data.tokenizer, c.model.text.vocab_size, c.model.text.eos_id, c.model.text.pad_id) == (
        "clip_bpe", 49_409, 49_407, 0,
    )  # fmt: skip
    assert (c.batch_size, c.total_steps, c.optim.warmup_steps, c.optim.warmup_init_lr) == (
        4096,
        128_001,
        2500,
        1e-4,
    )
    assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.b1, c.optim.b2, c.optim.eps) == (
        1e-3, 0.1, 0.9, 0.98, 1e-8,
    )  # fmt: skip
    assert c.optim.grad_accum_steps == 1 and c.hardware == "tpu-v5p-64"
    assert c.data.augment.views == {"slip": 2, "declip": 2, "filip": 1}.get(objective, c.data.augment.views)


def test_the_rn50_and_declip88m_docstrings_state_the_reported_result():
    reported = {"clip": 37.2, "declip": 44.4, "slip": 28.5, "filip": 21.3}  # RESNET.md
    for objective, top1 in reported.items():
        doc = importlib.import_module(f"configs.yfcc15m_{objective}_r50").__doc__
        assert f"top-1 {top1}" in doc and recipes_declip.RECIPES_R50[objective][2] == top1
    for tower, top1 in {"r50": 62.5, "vitb32": 66.2}.items():
        doc = importlib.import_module(f"configs.declip88m_declip_{tower}").__doc__
        assert f"top-1 {top1}" in doc and recipes_declip.DECLIP88M[tower] == top1


@pytest.mark.parametrize("tower", ["r50", "vitb32"])
def test_declip88m_requires_its_sources_naming_the_field(tower):
    c = importlib.import_module(f"configs.declip88m_declip_{tower}").get_config()
    assert c.objective.name == "declip" and c.data.require_sources
    c.data.train_files = "/data/yfcc15m/train-*.array_record"  # one corpus is not DeCLIP-88M's mixture
    with pytest.raises(ConfigError, match=r"config\.data\.sources is empty"):
        validate_config(c, num_devices=8)
    c.data.train_files = ""
    c.data.sources = {"yfcc15m": {"files": "/data/yfcc15m/train-*.array_record"}}
    validate_config(c, num_devices=8)
    local = importlib.import_module(f"configs.declip88m_declip_{tower}").get_config("local")
    validate_config(local, num_devices=8)
    assert local.model.size == ("RN-tiny" if tower == "r50" else "tiny") and not local.data.require_sources


@pytest.mark.parametrize("objective", R50)
def test_rn50_local_variant_is_a_resnet_on_the_demo_data(objective):
    c = _r50(objective, "local")
    validate_config(c, num_devices=8)
    assert c.objective.name == objective and c.model.vision.type == "resnet" and c.data.allow_demo


@pytest.mark.parametrize("field, value", [("eos_id", 1), ("pad_id", 3)])
def test_clip_bpe_ids_are_checked_before_any_compute(field, value):
    c = _r50("clip")
    c.data.train_files = "/data/yfcc15m/train-*.array_record"
    validate_config(c, num_devices=8)
    c.model.text[field] = value
    with pytest.raises(ConfigError, match=rf"config\.model\.text\.{field}={value}.*clip_bpe"):
        validate_config(c, num_devices=8)
