"""SLIP, DeCLIP, FILIP and DeFILIP through the step, the loop, checkpoints and export.

Each objective's loss terms are checked against their formulas elsewhere
(test_slip_terms.py, test_declip_terms.py, test_filip.py). Here: what the seam
promises (objectives/base.py, README "Objectives") once the heads, the queue
and the extra inputs (views, EDA and masked captions) go through the train
step, the loop, checkpoints and export:

1. one step gives the same loss, metrics, updated parameters (heads included)
   and queue on one device and on 8 devices with any mesh (global-batch BN,
   one global queue);
2. a step skipped for a non-finite loss leaves the queue as it was;
3. DeCLIP's queue is in every checkpoint, sharded by the "queue" rule, and a
   resumed run continues it (and the losses) bit for bit;
4. each objective's loss falls on the demo data;
5. `init_from` a CLIP checkpoint keeps its towers and starts the heads (and
   the queue) fresh; SigLIP starts from CLIP the same way;
6. export drops the heads, says so (log, config.json), and the exported
   towers give our embeddings;
7. the config refuses what an objective cannot do, naming the field.

Every config is the objective's `:local` recipe (recipes_declip.local_variant:
the tiny towers with TINY_HEADS' head and queue sizes, batch 16, the demo's
AltTexts). Compiling a step takes 10-30 s on the CPU, so the training runs use
one device and the same config as the one-device reference of (1): the same
program, which JAX's persistent compilation cache then serves. CI runs DeCLIP
(the objective with heads, state and every extra input); the other objectives'
runs and the other meshes are marked slow (`pytest -m slow tests/test_objectives.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import torch
import transformers
from jax.sharding import PartitionSpec as P
from PIL import Image

import veclip_jax
from tests.helpers import differing_leaves, host_copy, logged_metrics, tiny_run_config
from veclip_jax.config import ConfigError, validate_config
from veclip_jax.data import demo, image_ops, records
from veclip_jax.data.tokenizer import Tokenizer
from veclip_jax.hf.to_hf import OBJECTIVE_NOTES, export_checkpoint, params_to_hf, save_hf_directory
from veclip_jax.objectives import make_objective
from veclip_jax.objectives.model import abstract_params, build
from veclip_jax.parallel.mesh import global_batch, make_mesh
from veclip_jax.recipes import declip as recipes_declip
from veclip_jax.run.checkpoint import restore_params
from veclip_jax.train import loop
from veclip_jax.train.assembly import Assembly, assemble, synthetic_batch
from veclip_jax.train.optim import learning_rate_schedule
from veclip_jax.train.state import TrainState, state_shardings

OBJECTIVES = ("slip", "declip", "filip", "defilip")
MESHES = {
    "one_device": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}
FAST_MESH = "data2_fsdp2_tensor2"  # every mesh axis at once: the one CI runs
BATCH = 16  # the :local batch
RUN_STEPS = 30
# The metrics each objective logs beyond CLIP's (by name, as the loop logs every metric).
TERMS = {
    "slip": ("clip_loss", "ssl_loss", "ssl_accuracy"),
    "declip": ("clip_loss", "simsiam_loss", "mlm_loss", "mlm_accuracy", "nn_loss"),
    "filip": ("clip_loss", "filip_loss", "filip_i2t_accuracy", "filip_logit_scale"),
    "defilip": ("clip_loss", "simsiam_loss", "mlm_loss", "nn_loss", "filip_loss", "filip_logit_scale"),
}


def _slow_unless(fast: bool, *values: Any) -> Any:
    return pytest.param(*values, marks=() if fast else pytest.mark.slow)


def _run_config(name: str, demo_cache: str = "", **fields: Any):
    """The objective's :local config for RUN_STEPS steps on one device, no evaluation, saving at the end."""
    c = recipes_declip.local_variant(name)  # tiny towers; tiny_objective: views and TINY_HEADS' sizes
    c.data.cache_dir = demo_cache
    c.mesh.update(MESHES["one_device"])
    c.update(dict(total_steps=RUN_STEPS, eval_every=0, checkpoint_every=0) | fields)
    return c


# --- 1, 2: one step on any mesh; a skipped step ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Stepper:
    """The train step of an objective's run config on a mesh, built as loop.train builds it."""

    run: Assembly
    initial: TrainState  # init_train_state's state from the config's seed, on the host
    placement: TrainState  # ... and where init_train_state put each array

    def init(self) -> TrainState:
        """The initial state, placed as initialised (the step donates it: each call makes a new one)."""
        return jax.device_put(self.initial, self.placement)

    def batch(self, edit: Any = None) -> dict[str, jax.Array]:
        """The synthetic batch (every input the objective reads; `edit` may change its numpy arrays)."""
        local = synthetic_batch(self.run, BATCH)
        if edit is not None:
            edit(local)
        return global_batch(self.run.mesh, local)


@functools.cache
def _stepper(name: str, mesh_name: str) -> _Stepper:
    c = _run_config(name)
    c.mesh.update(MESHES[mesh_name])
    mesh = make_mesh(c.mesh, jax.devices()[:1] if mesh_name == "one_device" else None)
    run = assemble(c, mesh)
    state = run.init_state(jax.random.key(c.seed))
    placement = jax.tree.map(lambda x: x.sharding, state)
    return _Stepper(run, host_copy(state), placement)


@functools.cache
def _one_step(name: str, mesh_name: str) -> tuple[TrainState, TrainState, dict[str, float]]:
    """(state before, state after, metrics) of one step from the seed's initial state, synthetic batch."""
    s = _stepper(name, mesh_name)
    state = s.init()
    before = host_copy(state)
    state, metrics = s.run.step(state, s.batch())
    return before, host_copy(state), {k: float(v) for k, v in jax.device_get(metrics).items()}


def _max_diff(a: Any, b: Any) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _gradients(state: TrainState) -> dict[str, np.ndarray]:
    """Adam's first moment after one step from zero: (1 - b1) x each parameter's (clipped) gradient."""
    flat = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    return {k: x for k, x in ((jax.tree_util.keystr(p), x) for p, x in flat) if ".mu[" in k}


@pytest.mark.parametrize(
    "name, mesh_name",
    [
        _slow_unless(name == "declip" and mesh_name == FAST_MESH, name, mesh_name)
        for name in OBJECTIVES
        for mesh_name in MESHES
        if mesh_name != "one_device"
    ],
)
def test_one_step_is_the_same_on_one_device_and_on_every_mesh(name, mesh_name):
    before, want, want_metrics = _one_step(name, "one_device")
    _, got, metrics = _one_step(name, mesh_name)
    assert sorted(metrics) == sorted(want_metrics)
    assert set(TERMS[name]) <= set(metrics)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=2e-6, atol=1e-6, err_msg=key)
    assert metrics["step_applied"] == 1.0 and int(got.step) == 1

    # The gradients of every parameter, heads included (the heads were trained: not vacuous).
    want_g, got_g = _gradients(want), _gradients(got)
    assert sorted(got_g) == sorted(want_g) and any("['objective']" in k for k in want_g)
    # Gradients that are 0 (the key biases: the softmax ignores them) are rounding noise below `floor`.
    floor = 1e-6 * max(float(np.max(np.abs(g))) for g in want_g.values())
    for k, g in want_g.items():
        atol = 1e-4 * float(np.max(np.abs(g))) + floor
        np.testing.assert_allclose(got_g[k], g, rtol=0, atol=atol, err_msg=k)
    assert _max_diff(want.params["objective"], before.params["objective"]) > 1e-5
    # The updated parameters. Adam's first update is lr * g / (|g| + eps), about +-lr wherever |g| >> eps
    # (1e-8 in this recipe); where |g| is near eps, rounding noise in g moves it by a fraction of lr.
    lr = float(learning_rate_schedule(_run_config(name).optim, RUN_STEPS)(0))
    assert _max_diff(got.params, want.params) < 0.5 * lr

    assert jax.tree.structure(got.objective_state) == jax.tree.structure(want.objective_state)
    if name in ("declip", "defilip"):  # the queue: the batch's 2B text embeddings written at the pointer
        np.testing.assert_allclose(got.objective_state["queue"], want.objective_state["queue"], atol=1e-6)
        assert int(got.objective_state["ptr"]) == int(want.objective_state["ptr"]) == 2 * BATCH
        changed = np.any(want.objective_state["queue"] != before.objective_state["queue"], axis=1)
        assert np.flatnonzero(changed).tolist() == list(range(2 * BATCH))
    else:
        assert got.objective_state == {}


def test_a_skipped_non_finite_step_leaves_the_queue_unchanged():
    s = _stepper("declip", FAST_MESH)  # the step compiled for test 1
    state = s.init()
    before = host_copy(state)

    def nan_pixel(batch):  # one pixel of one view: the loss is NaN, the text embeddings are finite
        batch["views"] = batch["views"].astype(np.float32)  # pixels are uint8, which holds no NaN
        batch["views"][3, 1, 0, 0, 0] = np.nan

    state, metrics = s.run.step(state, s.batch(nan_pixel))
    skipped = host_copy(state)
    assert not math.isfinite(float(metrics["loss"])) and float(metrics["step_applied"]) == 0.0
    assert int(skipped.step) == 0 and int(skipped.nonfinite_steps) == 1
    assert differing_leaves(skipped.objective_state, before.objective_state) == []  # bit for bit
    assert differing_leaves(skipped.params, before.params) == []
    assert differing_leaves(skipped.opt_state, before.opt_state) == []

    # The next, finite, step is applied and pushes its 2B text embeddings.
    state, metrics = s.run.step(state, s.batch())
    applied = host_copy(state)
    assert float(metrics["step_applied"]) == 1.0 and int(applied.nonfinite_steps) == 1
    assert int(applied.objective_state["ptr"]) == 2 * BATCH
    assert differing_leaves(applied.objective_state, skipped.objective_state) == ["['ptr']", "['queue']"]


# --- 3: the queue's placement, checkpoint and resume ------------------------------------------------


def test_the_queue_is_sharded_over_its_rows_by_the_queue_rule():
    s = _stepper("declip", FAST_MESH)
    want = s.run.shardings.objective_state
    assert want["queue"].spec == P(("data", "fsdp"), None)  # rows over data x fsdp, as the examples
    assert want["ptr"].spec == P()
    size, dim = recipes_declip.TINY_HEADS["declip"]["queue_size"], s.run.model.towers.embed_dim
    placed = s.placement.objective_state["queue"]  # where init_train_state put it
    assert placed.is_equivalent_to(want["queue"], 2) and placed.shard_shape((size, dim)) == (size // 4, dim)
    # The placement comes from the rule: another rule moves it.
    rules = tuple((k, "tensor" if k == "queue" else v) for k, v in s.run.rules)
    moved = state_shardings(s.run.model, s.run.tx, s.run.mesh, rules).objective_state["queue"]
    assert moved.spec == P("tensor", None)


@pytest.fixture(scope="module")
def trained(demo_cache, tmp_path_factory):
    """name -> the workdir of the objective's run (RUN_STEPS steps on one device), trained on first use."""
    runs: dict[str, str] = {}

    def run(name: str) -> str:
        if name not in runs:
            workdir = str(tmp_path_factory.mktemp(f"run_{name}"))
            result = loop.train(_run_config(name, demo_cache), workdir, devices=jax.devices()[:1])
            assert result.step == RUN_STEPS
            runs[name] = workdir
        return runs[name]

    return run


def _train_item(workdir: str, step: int) -> dict:
    """The "train" item of a checkpoint as it is on disk (no target: whatever was saved)."""
    path = os.path.join(workdir, "checkpoints", str(step), "train")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)


def test_declip_queue_is_checkpointed_and_resumes_bit_exactly(trained, demo_cache, tmp_path):
    straight = trained("declip")
    config = _run_config("declip", demo_cache)
    half = RUN_STEPS // 2
    first = loop.train(config, str(tmp_path), devices=jax.devices()[:1], stop_after=half)
    assert first.step == half and first.preempted
    second = loop.train(config, str(tmp_path), devices=jax.devices()[:1])
    assert second.start_step == half and second.step == RUN_STEPS

    # Every logged metric of every step, bit for bit (nn_loss reads the queue restored at `half`).
    skip = ("images_per_sec", "seconds_per_step")
    resumed, want = ([{k: v for k, v in m.items() if k not in skip} for m in logged_metrics(w)]
                     for w in (str(tmp_path), straight))  # fmt: skip
    assert [m["nn_loss"] for m in resumed] == [m["nn_loss"] for m in want]
    assert resumed == want

    # The "train" item of each checkpoint holds the queue and its pointer.
    size = recipes_declip.TINY_HEADS["declip"]["queue_size"]
    dim = config.model.embed_dim
    for step in (half, RUN_STEPS):
        saved = _train_item(str(tmp_path), step)["objective_state"]
        assert saved["queue"].shape == (size, dim) and int(saved["ptr"]) == step * 2 * BATCH % size
    # The final checkpoint is the uninterrupted run's, bit for bit: queue, pointer, optimizer state.
    got, want = (_train_item(w, RUN_STEPS) for w in (str(tmp_path), straight))
    assert differing_leaves(got, want) == []
    got, want = (host_copy(restore_params(w)[0]) for w in (str(tmp_path), straight))
    assert differing_leaves(got, want) == []


# --- 4: training on the demo data ----------------------------------------------------------------


@pytest.mark.parametrize("name", [_slow_unless(name == "declip", name) for name in OBJECTIVES])
def test_loss_falls_on_the_demo_data(trained, name):
    lines = logged_metrics(trained(name))
    losses = [m["loss"] for m in lines]
    assert len(losses) == RUN_STEPS and all(math.isfinite(x) for x in losses), losses
    assert set(TERMS[name]) <= set(lines[-1])  # the loop logs the objective's metrics by name
    # Measured (mean of the last 5 / of the first 5): SLIP 0.82, DeCLIP 0.77, FILIP 0.79, DeFILIP 0.78.
    # FILIP's token-wise term learns slowly on the tiny towers: its fall is from the warm-up's rise back
    # to about chance (2.83 for log 16 = 2.77) in these 30 steps.
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.9 * first, losses


# --- 5: init_from -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBJECTIVES)
def test_the_heads_live_under_params_objective_and_the_rest_is_clips_tree(name):
    """What init_from starts fresh and export drops is params["objective"]: nothing else may be a head."""
    config = _run_config(name)
    params = abstract_params(build(config.model, make_objective(config.objective)))
    clip = abstract_params(build(config.model))
    assert params["objective"] and jax.tree.structure(_towers(params)) == jax.tree.structure(clip)


def _initial_state(config, workdir: str, monkeypatch) -> TrainState:
    """The state loop.train starts from (host copy), without training a step."""
    seen = []

    def spy(*args, **kwargs):
        state, start, streak = original(*args, **kwargs)
        seen.append(host_copy(state))
        return state, start, streak

    original = loop._initial_state
    monkeypatch.setattr(loop, "_initial_state", spy)
    result = loop.train(config, workdir, devices=jax.devices()[:1], stop_after=0)
    assert result.step == 0 and len(seen) == 1
    return seen[0]


def _towers(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "objective"}


def test_declip_init_from_a_clip_checkpoint_takes_its_towers_and_starts_heads_and_queue_fresh(
    tiny_run, demo_cache, tmp_path, monkeypatch, caplog
):
    source = tiny_run[0]  # a CLIP run of the tiny towers
    config = _run_config("declip", demo_cache, init_from=source)
    with caplog.at_level(logging.INFO, logger="veclip_jax.train.loop"):
        start = _initial_state(config, str(tmp_path), monkeypatch)
    clip, meta = restore_params(source)
    assert "objective" not in clip and meta["step"] > 0
    assert differing_leaves(_towers(start.params), host_copy(clip)) == []  # towers and temperature
    fresh = _stepper("declip", "one_device").initial  # the seed's initialisation, on the same mesh
    assert differing_leaves(start.params["objective"], fresh.params["objective"]) == []
    assert differing_leaves(start.objective_state, fresh.objective_state) == []
    assert differing_leaves(start.opt_state, fresh.opt_state) == [] and int(start.step) == 0
    assert _max_diff(_towers(start.params), _towers(fresh.params)) > 1e-3  # not the fresh towers
    assert "the objective's own parameters (objective) start fresh" in caplog.text


def test_siglip_init_from_a_clip_checkpoint_takes_its_towers_and_starts_the_bias_fresh(
    tiny_run, demo_cache, tmp_path, monkeypatch
):
    source = tiny_run[0]
    config = tiny_run_config(demo_cache, init_from=source, eval_every=0)
    config.objective.name = "siglip"
    start = _initial_state(config, str(tmp_path), monkeypatch)
    clip, _ = restore_params(source)
    # The towers and the temperature are CLIP's (not objective.siglip.temperature_init); the bias is new.
    assert differing_leaves(_towers(start.params), host_copy(clip)) == []
    assert float(start.params["objective"]["bias"]) == config.objective.siglip.bias_init


# --- 6: export ------------------------------------------------------------------------------------


def _demo_images(demo_cache: str, n: int = 4) -> list[Image.Image]:
    reader = records.RecordReader([demo.ensure_demo_data(demo_cache).eval_file])
    return [Image.open(io.BytesIO(reader[i].jpeg)) for i in range(n)]


def _flat_heads(params: dict) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(params["objective"])[0]
    named = {"/".join(k.key for k in path): np.shape(x) for path, x in flat}
    return {k: list(shape) for k, shape in named.items() if shape}


@pytest.mark.parametrize("name", [_slow_unless(name == "declip", name) for name in OBJECTIVES])
def test_export_drops_the_heads_says_so_and_keeps_the_towers_embeddings(
    trained, name, demo_cache, tmp_path, caplog
):
    workdir = trained(name)
    with caplog.at_level(logging.INFO, logger="veclip_jax.hf.to_hf"):
        out = export_checkpoint(workdir, str(tmp_path / "hf"))
    ours = veclip_jax.load(workdir)
    heads = _flat_heads(ours.params)
    assert heads and "dropping the objective's own parameters" in caplog.text
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["veclip_objective"] == name
    assert cfg["veclip_dropped_heads"] == heads
    assert ("veclip_notes" in cfg) == (name == "filip")
    tensors = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    assert sorted(tensors) == sorted(params_to_hf(_towers(ours.params)))  # CLIP's tensors, no head

    hf = transformers.CLIPModel.from_pretrained(out).eval()
    images = _demo_images(demo_cache)
    texts = ["a red circle.", "Purple Circle Stock Image", "A gray background with a small red triangle."]
    v = ours.model_config.vision  # HF takes host-normalised pixels; ours, uint8
    pixels = np.stack([ours.preprocess(im) for im in images])
    pixels = image_ops.normalize(pixels, v.image_mean, v.image_std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        hf_img = hf.get_image_features(pixel_values=torch.as_tensor(pixels))
        hf_txt = hf.get_text_features(input_ids=torch.as_tensor(ours.tokenize(texts), dtype=torch.long))
    hf_img, hf_txt = (torch.nn.functional.normalize(getattr(x, "pooler_output", x), dim=-1).numpy()
                      for x in (hf_img, hf_txt))  # fmt: skip
    assert np.max(np.abs(hf_img - ours.encode_image(images))) < 1e-4
    assert np.max(np.abs(hf_txt - ours.encode_text(texts))) < 1e-4


def test_filip_export_says_clipmodel_has_no_token_wise_similarity(demo_cache, tmp_path, caplog):
    config = _run_config("filip", demo_cache)
    model = build(config.model, make_objective(config.objective))
    params = jax.tree.map(lambda x: np.full(x.shape, 0.01, np.float32), abstract_params(model))
    tokenizer = Tokenizer(demo.ensure_demo_data(demo_cache).tokenizer, config.model.text.context_length)
    with caplog.at_level(logging.INFO, logger="veclip_jax.hf.to_hf"):
        out = save_hf_directory(str(tmp_path / "hf"), params, config.model, tokenizer, objective="filip")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["veclip_objective"] == "filip" and cfg["veclip_notes"] == OBJECTIVE_NOTES["filip"]
    token_dim = recipes_declip.TINY_HEADS["filip"]["token_dim"]
    assert cfg["veclip_dropped_heads"] == {
        "image_mapping/bias": [token_dim], "image_mapping/kernel": [64, token_dim],
        "text_mapping/bias": [token_dim], "text_mapping/kernel": [64, token_dim],
    }  # fmt: skip
    assert cfg["veclip_objective_params"] == {"scales/dense_logit_scale": pytest.approx(0.01)}
    assert "token-wise" in caplog.text and "image_mapping" in caplog.text


# --- 7: the config --------------------------------------------------------------------------------


def _refused(config, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=1)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_the_local_configs_are_valid_and_views_must_match_the_objective(name):
    config = _run_config(name)
    validate_config(config, num_devices=1)
    wrong = 3 - config.data.augment.views  # 1 <-> 2
    config.data.augment.views = wrong
    _refused(config, rf"config\.data\.augment\.views={wrong}: objective '{name}' reads")


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("declip", "queue_size", 0),
        ("defilip", "queue_size", -4),
        ("slip", "ssl_temperature", 0.0),
        ("slip", "ssl_weight", -1.0),
        ("declip", "nn_weight", math.nan),
        ("filip", "top_k", 2.5),
        ("defilip", "top_k", 0),
        ("filip", "token_dim", 0),
    ],
)
def test_a_bad_objective_field_is_refused_naming_it(name, field, value):
    config = _run_config(name)
    # Replaced as a whole: assigning 2.5 to an int field of a ConfigDict raises before any check.
    config.objective[name] = ml_collections.ConfigDict(config.objective[name].to_dict() | {field: value})
    _refused(config, rf"config\.objective\.{name}\.{field}={value!r}")


@pytest.mark.parametrize("name", OBJECTIVES)
def test_gradient_accumulation_is_refused(name):
    config = _run_config(name)
    config.optim.grad_accum_steps = 2
    _refused(config, rf"config\.optim\.grad_accum_steps=2: objective '{name}'")
