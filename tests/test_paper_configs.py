"""The paper's runs as configs: refused without data, a local variant that trains on the CPU, mesh
rules per accelerator, and the train step compiled for a TPU topology on this host (the paper's 13
configs and the DeCLIP toolkit's ResNet-50 / DeCLIP-88M rows: one golden compile table)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from veclip_jax import defaults
from veclip_jax.config import ConfigError, validate_config
from veclip_jax.errors import UserError
from veclip_jax.parallel import hardware
from veclip_jax.recipes import declip, veclip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = sorted(veclip.RUNS)
# The DeCLIP toolkit's rows compiled beside the paper's (recipes/declip.py): config -> the reported
# ImageNet zero-shot top-1 (the ViT-B/32 YFCC-15M configs share one program per objective with these
# rows' recipe and are not in the table).
TOOLKIT = {f"yfcc15m_{o}_r50": r[2] for o, r in declip.RECIPES_R50.items()} | {
    f"declip88m_declip_{tower}": top1 for tower, top1 in declip.DECLIP88M.items()
}
COMPILED = sorted([*PAPER, *TOOLKIT])
GOLDEN_COMPILE = os.path.join(ROOT, "tests", "golden_compile.json")


def _paper(name: str, arg: str | None = None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def test_every_paper_row_has_a_config_file():
    files = {f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")}
    assert set(PAPER) <= files
    assert len(PAPER) == 13


@pytest.mark.parametrize("name", PAPER)
def test_a_paper_config_without_data_is_refused_naming_the_data_fields(name):
    with pytest.raises(ConfigError, match=r"config\.data\.(train_files|sources\.\w+\.files)"):
        validate_config(_paper(name))


@pytest.mark.parametrize("name", PAPER)
def test_a_paper_config_states_the_papers_numbers_and_its_recipe(name):
    doc = importlib.import_module(f"configs.{name}").__doc__
    run = veclip.RUNS[name]
    assert f"ImageNet top-1 {run.results['imagenet']:.2f}" in doc
    assert f"global batch {run.batch_size:,}" in doc and run.hardware in doc and "not from the paper" in doc
    config = _paper(name)
    assert config.total_steps * config.batch_size == run.samples_seen
    assert config.model.vision.width == defaults.MODEL_SIZES[run.size]["vision"]["width"]


# The :local variants share one base (veclip.local_base; their configs are pinned by golden files):
# CI trains one of each kind (a VeCLIP mix, AltText-only CLIP, a two-corpus mixture at 336 px).
IN_CI = ("vecap200m_b16", "vecap12m_clip_b16", "dfn_vecap300m_h14_336")


@pytest.mark.parametrize(
    "name", [n if n in IN_CI else pytest.param(n, marks=pytest.mark.slow) for n in PAPER]
)
def test_every_local_variant_trains_on_the_cpu(name, demo_cache, tmp_path):
    from veclip_jax.train import loop

    config = _paper(name, "local")
    config.data.cache_dir = demo_cache
    result = loop.train(config, str(tmp_path))
    assert result.step == config.total_steps and result.eval
    assert np.isfinite(result.eval[next(iter(result.eval))])


@pytest.mark.parametrize(
    "name, devices, mesh, remat",
    [
        ("tpu-v5p-256", 128, dict(data=1, fsdp=-1), "dots"),
        ("tpu-v5p-1024", 512, dict(data=-1, fsdp=64), "dots"),
        ("tpu-v5p-256-2", 256, dict(data=-1, fsdp=64), "dots"),
        ("tpu-v5litepod-256", 256, dict(data=-1, fsdp=16), "full"),
        ("gpu-h100-32", 32, dict(data=-1, fsdp=8), "dots"),
    ],
)
def test_the_hardware_picks_its_rule(name, devices, mesh, remat):
    given = _paper("vecap200m_b16")
    given.hardware = name
    config, _ = hardware.apply_mesh_rules(given)
    assert {k: config.mesh[k] for k in mesh} == mesh
    assert config.model.remat == remat and config.model.dtype == "bfloat16"
    assert config.mesh.slices == (2 if name.endswith("-2") else 1)
    assert hardware.parse_hardware(name).total_chips == devices


def test_the_mesh_rule_is_applied_to_a_copy_that_is_checked_once():
    from veclip_jax.config import CheckedConfig, check_config

    given = _paper("vecap200m_b16", "local")
    given.hardware, given.mesh_rules = "tpu-v5p-8", (("tpu-v5p-.*", {"model.remat": "dots_no_batch"}),)
    before = given.to_json_best_effort(sort_keys=True)
    applied, rule = hardware.apply_mesh_rules(given)
    assert (rule, applied.model.remat, applied.mesh.slices) == ("tpu-v5p-.*", "dots_no_batch", 1)
    assert given.to_json_best_effort(sort_keys=True) == before  # the given config is not changed
    checked = check_config(given)
    assert isinstance(checked, CheckedConfig) and checked.mesh_rule == "tpu-v5p-.*"
    assert checked.verified().model.remat == "dots_no_batch" != given.model.remat
    checked.config.batch_size = 7  # changed after the check: train() would refuse it
    with pytest.raises(ConfigError, match="changed after check_config"):
        checked.verified()


def test_a_bad_hardware_name_and_a_rule_naming_no_field_are_refused():
    config = _paper("vecap200m_b16", "local")
    config.hardware = "tpu-v9-8"
    with pytest.raises(ConfigError, match=r"config\.hardware='tpu-v9-8'"):
        validate_config(config)
    config.hardware = ""
    config.mesh_rules = ((".*", {"mesh.fdsp": 2}),)
    with pytest.raises(ConfigError, match=r"config\.mesh\.fdsp is not a field"):
        validate_config(config)


def test_training_refuses_devices_that_are_not_the_named_hardware():
    with pytest.raises(UserError, match=r"expects TPU v5 devices, the run has \['cpu'\]"):
        hardware.check_devices("tpu-v5p-8", jax.devices())


def test_model_flops_follow_xlas_count_of_the_unrolled_step():
    from tests.helpers import random_batch
    from veclip_jax.bench.step import step_flops
    from veclip_jax.parallel.mesh import global_batch, make_mesh
    from veclip_jax.train.aot import train_flops_per_step
    from veclip_jax.train.assembly import assemble

    config = defaults.get_config("tiny")
    config.model.vision.update(width=128, mlp_dim=512)
    config.model.text.update(width=128, mlp_dim=512)
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    run = assemble(config, mesh)
    batch = global_batch(mesh, random_batch(config, config.batch_size))
    xla = step_flops(run, run.init_state(jax.random.key(0)), batch)
    assert train_flops_per_step(config) == pytest.approx(xla, rel=0.05)


def test_resnet_flops_match_open_clips_profile_and_count_every_tower_pass():
    from veclip_jax.train.aot import image_flops, model_flops_per_example, tower_passes, train_flops_per_step

    rn50 = defaults.get_config("RN50").model
    # open_clip's docs/model_profile.csv: RN50 image 12.22, text 5.96 GFLOPs. Its attention pool also
    # projects the 49 position tokens' queries and outputs (2 x 49 x 2048 x (2048 + 1024)), which only
    # token 0 uses; ours computes token 0's alone.
    extra_queries = 2 * 49 * 2048 * (2048 + 1024)
    assert image_flops(rn50) + extra_queries == pytest.approx(12.22e9, rel=0.005)
    assert model_flops_per_example(rn50) - image_flops(rn50) == pytest.approx(5.96e9, rel=0.01)
    passes = {o: tower_passes(_paper(f"yfcc15m_{o}_r50").objective) for o in declip.RECIPES_R50}
    assert passes == {"clip": (1, 1), "slip": (3, 1), "declip": (2, 2), "filip": (1, 1)}
    clip, slip = _paper("yfcc15m_clip_r50"), _paper("yfcc15m_slip_r50")
    two_views = 3 * clip.batch_size * 2 * image_flops(rn50)  # forward and backward of each
    assert train_flops_per_step(slip) - train_flops_per_step(clip) == pytest.approx(two_views)


@pytest.mark.slow  # compiles an unrolled ResNet step (~20 s); the formula is checked against open_clip in CI
def test_resnet_model_flops_follow_xlas_count_of_its_convolutions():
    from tests.helpers import random_batch
    from veclip_jax.bench.step import step_flops
    from veclip_jax.parallel.mesh import global_batch, make_mesh
    from veclip_jax.train.aot import train_flops_per_step
    from veclip_jax.train.assembly import assemble

    config = defaults.get_config("RN-tiny")
    config.model.vision.update(width=16, heads=8)  # convolutions, not BN and ReLU, dominate
    config.batch_size = 8
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    run = assemble(config, mesh)
    batch = global_batch(mesh, random_batch(config, config.batch_size))
    xla = step_flops(run, run.init_state(jax.random.key(0)), batch)
    assert train_flops_per_step(config) == pytest.approx(xla, rel=0.05)


def _libtpu_env() -> dict:
    from veclip_jax.train.aot import find_libtpu

    try:
        return dict(os.environ, TPU_LIBRARY_PATH=find_libtpu())
    except UserError as e:
        pytest.skip(str(e))  # make setup installs it; a bare pip install of requirements.txt does not


def test_the_tiny_step_compiles_for_a_tpu_topology_on_this_host(tmp_path):
    env = _libtpu_env()
    report = tmp_path / "report.json"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "compile.py"), "--config=configs/tiny.py",
           "--topology=v5p:2x2x1", f"--json={report}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["devices"] == 4 and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert 0 < r["params_bytes"] <= r["argument_bytes"] and r["temp_bytes"] > 0
    assert r["hbm_bytes"] == 95 * 2**30 and r["peak_bytes"] < r["hbm_bytes"]
    assert "per device:" in out.stdout and "images/s" in out.stdout
    # the roofline: three lower bounds, the winner, the MFU ceiling (tests/test_roofline.py: the arithmetic)
    assert "roofline per device" in out.stdout and "MFU ceiling" in out.stdout
    assert r["bound"] in ("compute", "memory", "collective") and 0 < r["mfu_ceiling"] <= 1
    assert r["xla_flops"] * r["devices"] >= 0.9 * r["flops_per_step"]  # the loops' trips applied
    # The same step on a chip too small for it: exit 2, by how much, and what would fit.
    small = subprocess.run([*cmd, "--hbm_gib=0.01", "--nofind_fit"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)  # fmt: skip
    assert small.returncode == 2
    assert "does not fit" in small.stderr and "GiB over" in small.stderr


def test_a_step_that_does_not_fit_gets_the_overrides_that_would():
    from veclip_jax.train import aot

    config = defaults.get_config("tiny")
    config.batch_size = 256
    devices = jax.devices()[:1]  # CPU devices compile in seconds; the search is the same
    accelerator = hardware.parse_hardware("tpu-v5p-8")
    mesh = dict(data=1, fsdp=1, tensor=1)
    config.mesh.update(mesh)
    baseline = aot.compile_step(config, accelerator, devices)
    accumulated = config.copy_and_resolve_references()
    accumulated.model.remat, accumulated.optim.grad_accum_steps = "dots", 2
    target = aot.compile_step(accumulated, accelerator, devices).peak_bytes
    assert target < baseline.peak_bytes
    # the search (tests/test_roofline.py checks its choice): the cheapest setting under the target,
    # at most 4 compiles here (none x 1, 2; dots x 1, 2)
    tried, best = aot.search_fit(config, accelerator, devices, target, max_accum=2)
    assert best is not None and best.report.peak_bytes <= target and (best.remat, best.grad_accum_steps) != (
        "none", 1)  # fmt: skip
    assert best.overrides.startswith("--config.model.remat=")


def test_the_golden_table_covers_every_paper_config_and_each_fits_its_pod():
    with open(GOLDEN_COMPILE) as f:
        table = json.load(f)
    assert sorted(table) == COMPILED
    for name, row in table.items():
        assert row["hardware"] == (veclip.RUNS[name].hardware if name in PAPER else "tpu-v5p-64"), name
        assert row["hardware"] == _paper(name).hardware, name
        assert row["peak_bytes"] <= row["hbm_bytes"], name
        # the mesh rules leave headroom: compile.py --search picks settings under 85 % of HBM
        assert row["peak_bytes"] <= 0.85 * row["hbm_bytes"], name


_GOLDEN_FIELDS = ("devices", "mesh", "params_bytes", "optimizer_bytes", "argument_bytes", "temp_bytes",
                  "peak_bytes", "hbm_bytes", "flops_per_step", "remat", "grad_accum_steps", "xla_flops",
                  "bytes_accessed", "collective_bytes", "compute_s", "memory_s", "collective_s", "bound",
                  "mfu_ceiling")  # fmt: skip


def _compile_key(name: str) -> str:
    """Configs that compile to the same program (same towers, objective and its views, batch, pod and
    rules) share one compile."""
    c = _paper(name)
    return json.dumps([c.model.to_dict(), c.objective.to_dict(), c.data.augment.views, c.batch_size,
                       c.hardware, c.optim.grad_accum_steps, [list(r) for r in c.mesh_rules]],
                      sort_keys=True, default=str)  # fmt: skip


def test_configs_that_differ_in_their_objective_do_not_share_a_compile():
    keys = {name: _compile_key(name) for name in TOOLKIT}
    assert len({keys[f"yfcc15m_{o}_r50"] for o in declip.RECIPES_R50}) == len(declip.RECIPES_R50)
    assert keys["declip88m_declip_r50"] == keys["yfcc15m_declip_r50"]  # only the data differs
    assert _compile_key("vecap200m_b16") == _compile_key("vecap200m_clip_b16")


_COMPILES: dict[str, dict] = {}  # compile key -> compile.py's JSON, shared by the parametrised runs


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_regenerate_the_golden_compile_table(name, tmp_path):
    """Compiles a config for its pod (minutes each; all of them about 40 minutes): UPDATE_GOLDEN=1
    rewrites its row. `-k "regenerate and r50"` picks rows by name."""
    key = _compile_key(name)
    if key not in _COMPILES:
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, os.path.join(ROOT, "launch", "compile.py"), f"--config=configs/{name}.py",
               f"--json={out}"]  # fmt: skip
        run = subprocess.run(cmd, cwd=ROOT, env=_libtpu_env(), capture_output=True, text=True, timeout=3600)
        assert run.returncode == 0, run.stderr[-3000:]
        _COMPILES[key] = json.loads(out.read_text())
    row = {k: _COMPILES[key][k] for k in _GOLDEN_FIELDS} | {"hardware": _paper(name).hardware}
    with open(GOLDEN_COMPILE) as f:
        golden = json.load(f)
    if "search" in golden.get(name, {}):  # compile.py --search's record of the rule's choice stays
        row["search"] = golden[name]["search"]
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden[name] = row
        with open(GOLDEN_COMPILE, "w") as f:
            json.dump(golden, f, indent=1, sort_keys=True)
            f.write("\n")
    assert row["peak_bytes"] == pytest.approx(golden[name]["peak_bytes"], rel=0.05), name
    assert row["flops_per_step"] == pytest.approx(golden[name]["flops_per_step"], rel=1e-6), name
