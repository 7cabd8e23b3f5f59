"""ResNet towers in training: every objective, any mesh, BatchNorm state kept like the parameters.

1. Every objective (CLIP, SigLIP, SLIP, DeCLIP, FILIP, DeFILIP) trains a ResNet (the RN-tiny
   towers of the `:local` configs) with a falling loss on a fixed batch, and gives the same losses,
   the same parameters and the same BatchNorm running averages on one device and on 8 devices
   (data=4 x fsdp=2): batch statistics are the global batch's on any mesh.
2. A skipped non-finite step leaves the running averages unchanged; an applied one moves them.
3. Gradient accumulation is refused for a BatchNorm tower, naming the field.
4. The running averages are in every checkpoint (`model_state`), resume bit-exactly, and are what
   `veclip_jax.load` evaluates with (an image's embedding does not depend on its batch).
5. The HF export refuses a ResNet (CLIPModel has none), saying which format holds it.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest
from helpers import differing_leaves, host_copy, logged_metrics

from veclip_jax import defaults
from veclip_jax.config import ConfigError, validate_config
from veclip_jax.parallel.mesh import global_batch, make_mesh
from veclip_jax.recipes import declip as recipes_declip
from veclip_jax.train import loop
from veclip_jax.train.assembly import assemble, synthetic_batch
from veclip_jax.train.state import TrainState

OBJECTIVES = ("clip", "siglip", "slip", "declip", "filip", "defilip")
# CI runs the pooled loss; the rest are slow tests (CI time). The ViT runs DeCLIP's views + MLM +
# queue path and FILIP's tokens on every mesh in CI (tests/test_objectives.py), and the ResNet's
# tokens (the last feature map) equal open_clip's in CI (tests/test_resnet.py).
CI_OBJECTIVES = ("clip",)
MESHES = {"one_device": dict(data=1, fsdp=1, tensor=1), "data4_fsdp2": dict(data=4, fsdp=2, tensor=1)}
BATCH = 16
STEPS = 4


def _config(name: str, demo_cache: str = ""):
    """The objective's :local config with the RN-tiny towers (the r50 configs' :local model)."""
    c = recipes_declip.local_variant(name)
    c.model = defaults.model_config("RN-tiny")
    c.data.cache_dir = demo_cache
    c.update(dict(eval_every=0, checkpoint_every=0))
    return c


@functools.cache
def _steps(name: str, mesh_name: str) -> tuple[list[dict[str, float]], TrainState, TrainState]:
    """(metrics of each of STEPS steps on one fixed synthetic batch, state before, state after)."""
    c = _config(name)
    c.mesh.update(MESHES[mesh_name])
    mesh = make_mesh(c.mesh, jax.devices()[:1] if mesh_name == "one_device" else None)
    run = assemble(c, mesh)
    state = run.init_state(jax.random.key(c.seed))
    before = host_copy(state)
    batch = global_batch(mesh, synthetic_batch(run, BATCH))
    metrics = []
    for _ in range(STEPS):
        state, m = run.step(state, batch)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return metrics, before, host_copy(state)


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in CI_OBJECTIVES else pytest.mark.slow) for n in OBJECTIVES]
)
def test_every_objective_trains_a_resnet_alike_on_one_device_and_on_eight(name):
    want, before, want_state = _steps(name, "one_device")
    got, _, got_state = _steps(name, "data4_fsdp2")
    losses = [m["loss"] for m in want]
    assert all(m["step_applied"] == 1.0 for m in want) and np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses  # it trains
    for w, g in zip(want, got, strict=True):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(g[key], w[key], rtol=2e-5, atol=1e-6, err_msg=key)
    # The BatchNorm running averages: in the state, moved by training, equal on both meshes.
    stats = want_state.model_state["batch_stats"]["vision_model"]
    assert set(stats) >= {"bn1", "layer1", "layer4"}
    assert _max_diff(want_state.model_state, before.model_state) > 1e-3
    # Reduction order differs across meshes: float32 rounding, compounded over STEPS steps (Adam's
    # first updates move a parameter whose gradient is near eps by a fraction of lr). Per-device
    # statistics would differ by ~1 (tests/test_resnet.py).
    pairs = zip(jax.tree.leaves(want_state.model_state), jax.tree.leaves(got_state.model_state), strict=True)
    for w, g in pairs:
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)
    # Parameters: Adam's first updates (lr * g / (|g| + eps)) amplify gradient rounding where |g| is
    # near eps, by up to a fraction of lr per step (as tests/test_objectives.py bounds one step).
    lr = _config(name).optim.learning_rate
    assert _max_diff(got_state.params, want_state.params) < 0.5 * lr * STEPS


def test_a_skipped_non_finite_step_leaves_the_running_averages_unchanged():
    c = _config("clip")
    c.mesh.update(MESHES["data4_fsdp2"])
    run = assemble(c, make_mesh(c.mesh))
    state = run.init_state(jax.random.key(0))
    before = host_copy(state)
    local = synthetic_batch(run, BATCH)
    local["image"] = np.full(local["image"].shape, np.nan, np.float32)
    state, metrics = run.step(state, global_batch(run.mesh, local))
    after = host_copy(state)
    assert float(metrics["step_applied"]) == 0.0 and int(after.nonfinite_steps) == 1
    assert differing_leaves(after.model_state, before.model_state) == []
    assert differing_leaves(after.params, before.params) == []


def test_gradient_accumulation_is_refused_for_a_batch_norm_tower():
    c = _config("clip")
    c.optim.grad_accum_steps = 2
    with pytest.raises(ConfigError, match=r"config\.optim\.grad_accum_steps=2: the ResNet"):
        validate_config(c, num_devices=1)
    c.model = defaults.model_config("tiny")  # the ViT keeps its exact accumulation
    validate_config(c, num_devices=1)


@pytest.fixture(scope="module")
def straight(demo_cache, tmp_path_factory) -> str:
    """yfcc15m_clip_r50:local for 4 steps, checkpoints at 2 and 4, one device."""
    workdir = str(tmp_path_factory.mktemp("rn_straight"))
    config = _loop_config(demo_cache)
    assert loop.train(config, workdir, devices=jax.devices()[:1]).step == 4
    return workdir


def _loop_config(demo_cache: str):
    from configs import yfcc15m_clip_r50

    c = yfcc15m_clip_r50.get_config("local")
    c.data.cache_dir = demo_cache
    c.update(dict(total_steps=4, checkpoint_every=2, eval_every=0))
    return c


def test_the_running_averages_are_checkpointed_and_resume_bit_exactly(straight, demo_cache, tmp_path):
    from veclip_jax.run.checkpoint import load_trained_params

    config = _loop_config(demo_cache)
    first = loop.train(config, str(tmp_path), devices=jax.devices()[:1], stop_after=2)
    assert first.step == 2
    second = loop.train(config, str(tmp_path), devices=jax.devices()[:1])
    assert second.start_step == 2 and second.step == 4
    skip = ("images_per_sec", "seconds_per_step")
    resumed, want = ([{k: v for k, v in m.items() if k not in skip} for m in logged_metrics(w)]
                     for w in (str(tmp_path), straight))  # fmt: skip
    assert resumed == want
    assert os.path.isdir(os.path.join(straight, "checkpoints", "4", "model_state"))
    got, ref = (load_trained_params(w) for w in (str(tmp_path), straight))
    assert differing_leaves(host_copy(got.model_state), host_copy(ref.model_state)) == []
    assert differing_leaves(host_copy(got.params), host_copy(ref.params)) == []
    # Not the initial averages (mean 0, variance 1): training moved them, and the checkpoint holds that.
    means = [
        np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(ref.model_state) if "mean" in str(p)
    ]
    assert max(float(np.max(np.abs(m))) for m in means) > 1e-3


def test_load_evaluates_with_the_running_averages(straight):
    import veclip_jax

    model = veclip_jax.load(straight)
    assert set(model.model_state) == {"batch_stats"}
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (3, 80, 80, 3), dtype=np.uint8))
    together = model.encode_image(images)
    alone = np.concatenate([model.encode_image([im]) for im in images])
    np.testing.assert_allclose(alone, together, atol=1e-5)  # not batch statistics
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_the_hf_export_refuses_a_resnet_naming_the_format_that_holds_it(straight, tmp_path):
    from veclip_jax.errors import UserError
    from veclip_jax.hf.to_hf import export_checkpoint

    out = tmp_path / "hf"
    with pytest.raises(UserError, match="no ResNet image tower.*--format=open_clip"):
        export_checkpoint(straight, str(out))
    assert not out.exists()


def test_a_checkpoint_saved_before_the_tower_field_existed_resumes_as_a_vit():
    from veclip_jax.train.resume import check_saved_config

    config = recipes_declip.local_variant("clip")  # a ViT run
    saved = config.to_dict()
    del saved["model"]["vision"]["type"], saved["model"]["vision"]["resnet_layers"]
    del saved["data"]["require_sources"]
    check_saved_config(config, {"config": saved}, 2)  # absent then = its default ("vit") then
    resnet = _config("clip")
    with pytest.raises(ConfigError, match=r"config\.model\.vision\.type 'vit' -> 'resnet'"):
        check_saved_config(resnet, {"config": saved}, 2)
