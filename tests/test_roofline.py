"""The roofline of a compiled step (veclip_jax/parallel/roofline.py), the search over remat x
accumulation (train/aot.py `search_fit`), and command-line fields winning over the hardware's mesh
rule (parallel/hardware.py `apply_mesh_rules(keep=...)`, train.py and compile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from veclip_jax import defaults
from veclip_jax.config import check_config
from veclip_jax.parallel import hardware, roofline
from veclip_jax.recipes import veclip
from veclip_jax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHIP = hardware.Chip("test", 1.0, 100.0, 1, 2, hbm_gbps=1000.0, ici_gbps=50.0)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


def test_a_matmuls_flops_and_bytes_and_the_three_bounds():
    m, k, n = 64, 128, 32
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    roof, detail = roofline.step_roofline(compiled, CHIP, model_flops=2 * m * k * n)
    assert detail["factors"] == {"flops": 1.0, "bytes accessed": 1.0} and detail["trips"] == {}
    assert roof.flops == 2 * m * k * n
    assert roof.bytes_accessed == 4 * (m * k + k * n + m * n)  # read both operands, write the product
    assert roof.collective_bytes == 0 and roof.collective_s == 0
    assert roof.compute_s == pytest.approx(2 * m * k * n / 100e12)
    assert roof.memory_s == pytest.approx(4 * (m * k + k * n + m * n) / 1000e9)
    assert roof.bound == "memory" and roof.bound_s == roof.memory_s  # 85 FLOPs/byte of 100 needed
    assert roof.mfu_ceiling == pytest.approx(roof.compute_s / roof.memory_s)


def test_a_scanned_loop_is_counted_once_per_trip():
    """XLA's cost analysis counts a while body once; the roofline multiplies it by its trips."""
    layers, m, k = 6, 32, 64

    def scanned(x, ws):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    x, ws = jnp.ones((m, k)), jnp.ones((layers, k, k))
    compiled = jax.jit(scanned).lower(x, ws).compile()
    once = _cost(compiled)["flops"]
    roof, detail = roofline.step_roofline(compiled, CHIP, model_flops=0.0)
    assert list(detail["trips"].values()) == [layers] and not detail["unknown_trips"]
    assert once == pytest.approx(2 * m * k * k, rel=0.05)
    assert roof.flops == pytest.approx(layers * 2 * m * k * k, rel=0.05)


# A loop counting 0, 2, 4, ... below 16 (XLA's windowed einsums step so): 8 trips, not 16.
_STEP_TWO = """HloModule step_two

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  %x = f32[4] get-tuple-element(%p), index=1
  %y = f32[4] multiply(%x, %x)
  ROOT %t = (s32[], f32[4]) tuple(%next, %y)
}

%cond (q: (s32[], f32[4])) -> pred[] {
  %q = (s32[], f32[4]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %limit = s32[] constant(16)
  ROOT %lt = pred[] compare(%j, %limit), direction=LT
}

ENTRY %main (a: f32[4]) -> (s32[], f32[4]) {
  %a = f32[4] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]) tuple(%zero, %a)
  ROOT %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body
}
"""


def test_trip_counts_follow_the_counters_step_and_shapes_their_bytes():
    module = roofline.parse_module(_STEP_TWO)
    mult, trips, unknown = roofline.multiplicities(module)
    assert trips == {"body": 8} and mult["body"] == 8 and not unknown
    # XLA counts 6 FLOPs: the body's (a 4-element multiply, the counter's add) and the condition's
    # compare, once each; the step runs the body 8 times (the condition's trips are not added)
    assert roofline.generic_cost(_STEP_TWO)["flops"] == 6
    assert 6 * roofline.loop_factors(_STEP_TWO)["factors"]["flops"] == pytest.approx(1 + 8 * 5)
    assert roofline.shape_bytes("(s32[], bf16[2,3]{1,0:T(8,128)(2,1)}, /*index=2*/f8e4m3fn[4])") == 4 + 12 + 4


def test_collective_bytes_of_a_sharded_computation_per_device():
    """8 devices: an all-gather receives its whole result, a psum moves its operand, a permute
    its operand; inside a 3-trip scan, three times."""
    mesh = jax.make_mesh((8,), ("d",))

    def body(x):
        gathered = jax.lax.all_gather(x, "d", tiled=True)  # f32[8, 128] from f32[1, 128]
        summed = jax.lax.psum(x * 2, "d")  # f32[1, 128]
        shifted = jax.lax.ppermute(x, "d", [(i, (i + 1) % 8) for i in range(8)])

        def loop(h, _):
            return h + jax.lax.psum(h, "d"), None

        looped = jax.lax.scan(loop, x, None, length=3)[0]
        return gathered.sum(0, keepdims=True) + summed + shifted + looped

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    x = jax.device_put(np.ones((8, 128), np.float32), NamedSharding(mesh, P("d")))
    moved = roofline.collective_bytes(f.lower(x).compile().as_text())
    row = 128 * 4
    assert moved["all-gather"] == 8 * row
    assert moved["all-reduce"] == row + 3 * row  # the psum, then the scanned one's 3 trips
    assert moved["collective-permute"] == row


def test_the_golden_rows_bounds_follow_from_their_figures_and_the_chip_table():
    with open(os.path.join(ROOT, "tests", "golden_compile.json")) as f:
        golden = json.load(f)
    rows = {name: row for name, row in golden.items() if "compute_s" in row}
    assert rows, "no golden row has its roofline: regenerate one (README: Reproduce the paper)"
    for name, row in rows.items():
        chip = hardware.parse_hardware(row["hardware"]).chip
        assert row["compute_s"] == pytest.approx(row["xla_flops"] / (chip.peak_bf16_tflops * 1e12)), name
        assert row["memory_s"] == pytest.approx(row["bytes_accessed"] / (chip.hbm_gbps * 1e9)), name
        assert row["collective_s"] == pytest.approx(row["collective_bytes"] / (chip.ici_gbps * 1e9)), name
        bound = max(row["compute_s"], row["memory_s"], row["collective_s"])
        model = row["flops_per_step"] / row["devices"] / (chip.peak_bf16_tflops * 1e12)
        assert row["mfu_ceiling"] == pytest.approx(model / bound), name
        # the compiled step does at least the model's matmuls (remat and the rest come on top)
        assert row["xla_flops"] * row["devices"] >= 0.95 * row["flops_per_step"], name
    table = aot.golden_tables(golden)
    assert all(f"`{name}`" in table for name in golden) and "MFU ceiling" in table


# --- the search ----------------------------------------------------------------------------------


def _tiny(batch: int = 64):
    config = defaults.get_config("tiny")
    config.batch_size = batch
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    return config


def _fake_compile():
    """Peak memory halves with each doubling of the accumulation steps; the bound grows a little
    (more weight gathers); more recomputation, a higher bound."""
    calls = []
    base, bound = {"none": 90, "dots": 60, "full": 30}, {"none": 1.0, "dots": 1.1, "full": 1.3}

    def compile_fn(config, accelerator, devices):
        remat, k = config.model.remat, config.optim.grad_accum_steps
        calls.append((remat, k))
        return aot.CompiledStep("tpu-v5p-16", 8, {}, 0, 0, 0, base[remat] / k, 0, 0, 10**12, 1e12, 1e15,
                                0.0, 0, remat=remat, grad_accum_steps=k,
                                compute_s=bound[remat] + 0.05 * k)  # fmt: skip

    return compile_fn, calls


def test_the_search_takes_the_cheapest_that_fits_and_stops_at_a_fit_without_accumulation():
    accelerator, devices = hardware.parse_hardware("tpu-v5p-16"), jax.devices()
    compile_fn, calls = _fake_compile()
    tried, best = aot.search_fit(_tiny(), accelerator, devices, 65, compile_fn=compile_fn)
    # none fits with 2 steps; dots fits without accumulation, so full is never compiled
    assert calls == [("none", 1), ("none", 2), ("dots", 1)]
    assert (best.remat, best.grad_accum_steps) == ("none", 2)  # the lowest bound of those that fit
    assert best.overrides == "--config.model.remat=none --config.optim.grad_accum_steps=2"
    assert "<- cheapest" in aot.describe_search(tried, best, 65)
    # a budget of 20: none fits with 8 steps (1.4), dots with 4 (1.3), full with 2 (1.4)
    compile_fn, calls = _fake_compile()
    _, best = aot.search_fit(_tiny(), accelerator, devices, 20, compile_fn=compile_fn)
    assert (best.remat, best.grad_accum_steps) == ("dots", 4) and calls[-1] == ("full", 2)
    # a budget of 5: only full with 8 steps fits; 16 steps do not divide the 8 examples per shard
    search = aot.search_fit(_tiny(), accelerator, devices, 5, max_accum=16, compile_fn=_fake_compile()[0])
    tried, best = search
    assert (best.remat, best.grad_accum_steps) == ("full", 8)
    refused = [c for c in tried if c.refused]
    assert [(c.remat, c.grad_accum_steps) for c in refused] == [("none", 16), ("dots", 16)]
    assert "does not divide" in refused[0].refused and "refused" in aot.describe_search(tried, best, 5)
    assert aot.search_fit(_tiny(), accelerator, devices, 1, compile_fn=_fake_compile()[0])[1] is None


def test_the_search_compiles_a_tiny_step_on_8_devices():
    """The real compile on the 8 fake CPU devices: one candidate (none, 1) fits a large budget."""
    accelerator, devices = hardware.parse_hardware("tpu-v5p-16"), jax.devices()
    assert len(devices) == 8
    tried, best = aot.search_fit(_tiny(), accelerator, devices, 2**40)
    assert [(c.remat, c.grad_accum_steps) for c in tried] == [("none", 1)] and best is tried[0]
    report = best.report
    assert report.xla_flops * report.devices >= 0.9 * report.flops_per_step  # XLA's count, loops applied
    assert report.bytes_accessed > 0 and report.collective_bytes > 0  # FSDP gathers the weights
    assert 0 < report.mfu_ceiling < 1 and report.bound in ("compute", "memory", "collective")
    summary = report.summary()
    assert summary["remat"] == "none" and summary["peak_bytes"] == report.peak_bytes


# --- an explicit override wins over the hardware's mesh rule ------------------------------------


def test_a_field_given_on_the_command_line_wins_over_the_mesh_rule():
    config = veclip.paper_config("dfn_vecap300m_h14_336")
    config.model.remat = "dots"  # as --config.model.remat=dots leaves it
    applied, rule = hardware.apply_mesh_rules(config, keep=("model.remat",))
    assert rule is not None and applied.model.remat == "dots"
    assert applied.mesh.fsdp == 64  # the rule's other fields still apply
    assert hardware.apply_mesh_rules(config)[0].model.remat == dict(hardware.matching_rule(
        config.mesh_rules, config.hardware)[1])["model.remat"]  # fmt: skip
    argv = ["--config=x.py", "--config.model.remat=dots", "--workdir=w"]
    assert hardware.user_fields(argv) == ("model.remat",)
    assert hardware.user_fields({"model.remat": "dots", "mesh.fsdp": 8}) == ("model.remat", "mesh.fsdp")


def test_train_py_checks_the_config_with_the_command_lines_remat(tmp_path):
    """The CLI's own path (flags -> checked config): the rule for tpu-v5p-8 says dots."""
    code = (
        "import sys\nfrom veclip_jax.cli import train\n"
        "sys.argv = ['train', '--config=configs/vecap200m_b16.py:local', '--config.hardware=tpu-v5p-8', "
        f"'--config.model.remat=dots_no_batch', '--workdir={tmp_path}']\n"
        "train._parse_flags(sys.argv)\nchecked = train.checked_config()\n"
        "print('REMAT', checked.config.model.remat, checked.mesh_rule is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REMAT dots_no_batch True" in out.stdout
    assert "note: config.model.remat=dots_no_batch (given; the tpu-v5p-8 rule says dots)" in out.stderr
    # without the flag the rule applies
    plain = code.replace("'--config.model.remat=dots_no_batch', ", "")
    out = subprocess.run([sys.executable, "-c", plain], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "REMAT dots True" in out.stdout, out.stderr[-2000:]


def test_check_config_keeps_the_given_fields():
    config = veclip.paper_config("vecap200m_b16", "local")
    config.hardware, config.model.remat = "tpu-v5p-8", "full"
    assert check_config(config, keep=("model.remat",)).config.model.remat == "full"
    assert check_config(config).config.model.remat == "dots"


def test_compile_py_compiles_the_command_lines_remat_and_refuses_it_with_search():
    """compile.py's own path (flags -> the config it compiles), without compiling; --search with
    a remat given is refused (exit 2) before anything compiles."""
    code = (
        "import sys\nfrom absl import flags\nfrom ml_collections import config_flags\n"
        "from veclip_jax.cli import compile as c\nfrom veclip_jax.parallel.hardware import user_fields\n"
        "sys.argv = ['compile', '--config=configs/dfn_vecap300m_h14_336.py', '--config.model.remat=dots']\n"
        "flags.FLAGS(sys.argv)\n"
        "given = user_fields(config_flags.get_override_values(flags.FLAGS['config']))\n"
        "config, accelerator, topology = c.prepare(c._CONFIG.value, given, None)\n"
        "print('REMAT', config.model.remat, config.mesh.fsdp, topology)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "REMAT dots 64 v5p:8x8x8" in out.stdout, out.stderr[-2000:]
    assert "config.model.remat=dots (given; the tpu-v5p-1024 rule says full)" in out.stderr
    cmd = [sys.executable, os.path.join(ROOT, "launch", "compile.py"), "--config=configs/tiny.py",
           "--topology=v5p:2x2x1", "--search", "--config.model.remat=dots"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--search tries model.remat" in out.stderr
