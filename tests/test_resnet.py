"""CLIP's ModifiedResNet tower (models/resnet.py) and its open_clip mapping (openclip/resnet.py).

The reference is open_clip's own ModifiedResNet, run in a process of its own (tests/openclip_ref.py),
on random weights and random running statistics: eval mode, train mode (outputs and the running
statistics torch's BatchNorm2d writes), and the final map's tokens.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from openclip_ref import available, run_reference

from veclip_jax.defaults import SHARDING_RULES
from veclip_jax.errors import UserError
from veclip_jax.models.resnet import ModifiedResNet, ResNetConfig
from veclip_jax.openclip.resnet import resnet_from_openclip, resnet_to_openclip
from veclip_jax.parallel.axes import BATCH_AXES, MESH_AXES

# Stage 2 has 3 blocks: blocks 1..2 go through the scan, in order.
TINY = ResNetConfig(layers=(1, 3, 1, 1), width=8, heads=2, image_size=64, embed_dim=16)

# name: (layers, width, image size, joint embedding), as open_clip's model_configs/*.json.
SIZES = {
    "RN50": ((3, 4, 6, 3), 64, 224, 1024),
    "RN101": ((3, 4, 23, 3), 64, 224, 512),
    "RN50x4": ((4, 6, 10, 6), 80, 288, 640),
    "RN50x16": ((6, 8, 18, 8), 96, 384, 768),
    "RN50x64": ((3, 15, 36, 10), 128, 448, 1024),
}


def need_reference() -> None:
    if why := available():
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)


def images(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 64, 64, 3)).astype(np.float32)


def random_variables(cfg: ResNetConfig = TINY, seed: int = 0) -> dict:
    """Every parameter random (BN scales and biases too: the zero-init bn3 would hide a block) and
    random running statistics, so that eval mode reads them."""
    variables = nn.unbox(ModifiedResNet(cfg).init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3))))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(variables)
    for path, a in flat.items():
        noise = rng.normal(size=a.shape).astype(np.float32)
        flat[path] = {
            "kernel": np.asarray(a) + 0.01 * noise if "attnpool" in path else np.asarray(a),
            "scale": 1 + 0.2 * noise,
            "bias": 0.1 * noise,
            "mean": 0.1 * noise,
            "var": rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
            "positional_embedding": np.asarray(a),
        }[path[-1]]
    return traverse_util.unflatten_dict(flat)


TORCH_FORWARD = """
m = open_clip.modified_resnet.ModifiedResNet(
    layers=[1, 3, 1, 1], output_dim=16, heads=2, image_size=64, width=8)
sd = {k[3:]: torch.from_numpy(v) for k, v in inputs.items() if k.startswith("sd.")}
m.load_state_dict(sd, strict=True)
x = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2).contiguous()
with torch.no_grad():
    m.eval()
    outputs["eval"] = m(x).numpy()
    y = m.layer4(m.layer3(m.layer2(m.layer1(m.stem(x)))))
    outputs["tokens"] = y.flatten(2).transpose(1, 2).numpy()
    m.train()
    outputs["train"] = m(x).numpy()
for k, v in m.state_dict().items():
    if "running" in k:
        outputs["stats." + k] = v.numpy()
"""


def test_matches_open_clip_eval_train_and_tokens():
    need_reference()
    variables, x = random_variables(), images(4)
    sd = resnet_to_openclip(variables["params"], variables["batch_stats"])
    ref = run_reference(TORCH_FORWARD, images=x, **{f"sd.{k}": v for k, v in sd.items()})
    model = ModifiedResNet(TINY)
    pooled, tokens = model.apply(variables, x, return_tokens=True)
    assert tokens.shape == (4, TINY.grid**2, TINY.token_width)
    np.testing.assert_allclose(pooled, ref["eval"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(tokens, ref["tokens"], atol=1e-5, rtol=0)
    train, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(train, ref["train"], atol=1e-5, rtol=0)
    assert np.abs(train - pooled).max() > 1e-3  # train mode really used batch statistics
    new_sd = resnet_to_openclip(variables["params"], updated["batch_stats"])
    for key, want in ((k[6:], v) for k, v in ref.items() if k.startswith("stats.")):
        # torch moves running_var towards the unbiased batch variance: so do we
        np.testing.assert_allclose(new_sd[key], want, atol=1e-6, rtol=1e-6, err_msg=key)
        assert not np.allclose(new_sd[key], sd[key]), key


def test_sharded_batch_gives_the_one_device_statistics():
    """Batch 16 over data x fsdp = 4 x 2 (parameters sharded by the rules): the same output and
    running statistics as on one device, i.e. statistics of the global batch, not per shard."""
    variables, x = random_variables(), images(16, seed=2)

    def train(v, x):
        return ModifiedResNet(TINY).apply(v, x, train=True, mutable=["batch_stats"])

    with jax.default_device(jax.devices()[0]):
        one = jax.jit(train)(variables, x)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), MESH_AXES)
    specs = nn.get_partition_spec(ModifiedResNet(TINY).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, SHARDING_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(SHARDING_RULES):
        placed = jax.device_put(variables, shardings)
        many = jax.jit(train)(placed, jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES))))
    assert placed["params"]["layer4"]["block0"]["conv3"]["kernel"].sharding.spec[-1] == "fsdp"
    assert len(many[0].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=3e-5)  # sum order


def test_parameter_counts_and_sizes_match_open_clip():
    need_reference()
    code = """
import json
from open_clip.modified_resnet import ModifiedResNet
for name in inputs["names"]:
    v = open_clip.get_model_config(str(name))["vision_cfg"]
    e = open_clip.get_model_config(str(name))["embed_dim"]
    outputs[f"{name}.cfg"] = np.array([*v["layers"], v["width"], v["image_size"], e])
    with torch.device("meta"):
        m = ModifiedResNet(v["layers"], e, v["width"] * 32 // 64, v["image_size"], v["width"])
    outputs[f"{name}.count"] = np.array(sum(p.numel() for p in m.parameters()))
with torch.device("meta"):
    visual = open_clip.create_model("RN50", device="meta").visual
outputs["RN50.model"] = np.array(sum(p.numel() for p in visual.parameters()))
"""
    ref = run_reference(code, names=np.array(list(SIZES)))
    assert int(ref["RN50.model"]) == int(ref["RN50.count"]) == 38_316_896
    for name, (layers, width, size, embed) in SIZES.items():
        assert list(ref[f"{name}.cfg"]) == [*layers, width, size, embed], name
        cfg = ResNetConfig(layers, width, width * 32 // 64, size, embed)
        shapes = jax.eval_shape(ModifiedResNet(cfg).init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
        count = sum(a.size for a in jax.tree.leaves(nn.unbox(shapes["params"])))
        assert count == int(ref[f"{name}.count"]), name


def test_open_clip_mapping_round_trip_and_refusals():
    variables = random_variables()
    sd = resnet_to_openclip(variables["params"], variables["batch_stats"])
    assert sd["layer2.0.downsample.0.weight"].shape == (64, 32, 1, 1)  # OIHW
    assert sd["attnpool.q_proj.weight"].shape == (256, 256)
    assert sd["attnpool.c_proj.weight"].shape == (16, 256)
    assert sd["layer2.2.bn3.num_batches_tracked"].dtype == np.int64
    assert {k for k in sd if k.startswith("layer2.")} >= {"layer2.1.conv1.weight", "layer2.2.conv1.weight"}
    shapes = jax.eval_shape(ModifiedResNet(TINY).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    params, stats = resnet_from_openclip(sd, shapes["params"], shapes["batch_stats"])
    back = {"batch_stats": stats, "params": params}
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    # block k of a stage is open_clip's block k: the stacked order is kept
    np.testing.assert_array_equal(
        sd["layer2.2.conv2.weight"],
        np.asarray(variables["params"]["layer2"]["blocks"]["conv2"]["kernel"][1]).transpose(3, 2, 0, 1),
    )
    bad = dict(sd, **{"layer2.1.conv2.weight": np.zeros((16, 16, 1, 3), np.float32)})
    with pytest.raises(UserError, match=r"visual\.layer2\.1\.conv2\.weight has shape \(16, 16, 1, 3\)"):
        resnet_from_openclip(bad, shapes["params"], shapes["batch_stats"])
    missing = {k: v for k, v in sd.items() if k != "attnpool.k_proj.bias"}
    with pytest.raises(UserError, match=r"visual\.attnpool\.k_proj\.bias is missing"):
        resnet_from_openclip(missing, shapes["params"], shapes["batch_stats"])
    extra = dict(sd, **{"layer2.3.conv1.weight": sd["layer2.2.conv1.weight"]})
    with pytest.raises(UserError, match=r"visual\.layer2\.3\.conv1\.weight is not part of the model"):
        resnet_from_openclip(extra, shapes["params"], shapes["batch_stats"])


def test_init_zero_last_bn_and_open_clip_scales():
    variables = nn.unbox(ModifiedResNet(TINY).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    p = variables["params"]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert not np.any(p[stage]["block0"]["bn3"]["scale"]), stage
        assert np.all(p[stage]["block0"]["bn2"]["scale"] == 1), stage
    assert not np.any(p["layer2"]["blocks"]["bn3"]["scale"])
    c = TINY.token_width
    for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
        assert abs(np.std(p["attnpool"][name]["kernel"]) * c**0.5 - 1) < 0.05, name
    assert abs(np.std(p["attnpool"]["positional_embedding"]) * c**0.5 - 1) < 0.2
    stats = variables["batch_stats"]
    assert all(
        np.all(v == 0) for v in jax.tree.leaves({k: s["mean"] for k, s in stats.items() if "mean" in s})
    )
    # the stem conv is kaiming normal over fan_out (3 * 3 * 4 outputs)
    assert abs(np.std(p["conv1"]["kernel"]) * (36 / 2) ** 0.5 - 1) < 0.3


def train_apply(cfg: ResNetConfig):
    return jax.jit(lambda v, x: ModifiedResNet(cfg).apply(v, x, train=True, mutable=["batch_stats"]))


def test_scan_unroll_remat_and_bf16_agree():
    variables, x = random_variables(), images(2)
    want = train_apply(TINY)(variables, x)
    for cfg in (dataclasses.replace(TINY, unroll=True), dataclasses.replace(TINY, remat="full")):
        got = train_apply(cfg)(variables, x)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    bf16 = dataclasses.replace(TINY, dtype=jnp.bfloat16, remat="dots")
    pooled, new = train_apply(bf16)(variables, x)
    assert pooled.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new))
    np.testing.assert_allclose(
        new["batch_stats"]["bn1"]["var"], want[1]["batch_stats"]["bn1"]["var"], rtol=2e-2
    )

    def loss(params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        return (
            ModifiedResNet(bf16).apply(v, x, train=True, mutable=["batch_stats"])[0].astype(jnp.float32).sum()
        )

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="expects 64px"):
        ModifiedResNet(TINY).apply(variables, np.zeros((1, 32, 32, 3), np.float32))
