"""Issue 25 #5, the accelerator benchmark (scripts/bench_gpu.sh, veclip_jax/bench/gpu.py) without an
accelerator: its CPU path runs end to end through the script, and its decisions (batch search,
out-of-memory vs other failures, the cuDNN -> XLA fallback, the spec peaks, open_clip's report)
are checked with fake runs. Timings are printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.openclip_ref import available
from veclip_jax import defaults
from veclip_jax.bench import gpu, torch_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_gpu.sh")


def _script(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    # One CPU device and fast compiles (the tests' conftest forces 8 host devices on XLA_FLAGS).
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "BENCH_PYTHON": sys.executable,
           **env}  # fmt: skip
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _bench_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith('{"bench_gpu"')]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])["bench_gpu"]


def test_the_scripts_cpu_path_prints_the_table_and_one_json_line():
    run = _script("--parts=b16", BENCH_PLATFORM="cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train (ours)" in run.stdout and "images/s" in run.stdout
    out = _bench_json(run.stdout)
    assert out["smoke"] and out["platform"] == "cpu" and out["skipped"] == {}
    b16 = out["parts"]["b16"]
    assert b16["batch"] == 4 and b16["images_per_s"] > 0 and b16["dtype"] == "bfloat16"
    assert b16["flops_from"] == "lowered" and b16["flops"] > 0 and 0 < b16["mfu"]
    assert b16["attention"] == "xla"  # cuDNN only on a GPU


def test_the_gpu_path_without_a_gpu_stops_before_installing_anything(tmp_path):
    run = _script(BENCH_VENV=str(tmp_path / "venv"), PATH="/usr/bin:/bin", timeout=60)
    assert run.returncode == 2 and "nvidia-smi finds no GPU" in run.stderr, run.stderr
    assert not (tmp_path / "venv").exists()


def test_spec_peaks_are_found_by_device_name():
    cases = {"NVIDIA H200": 989, "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756,
             "NVIDIA GH200 480GB": 989, "NVIDIA A100-SXM4-80GB": 312, "NVIDIA L40S": 362,
             "NVIDIA L4": 121, "TPU v5 lite": 197}  # fmt: skip
    for name, peak in cases.items():
        assert gpu.spec_peak_tflops(name) == peak, name
    assert gpu.spec_peak_tflops("Some Future GPU") is None  # then measured, and said so


def test_the_batch_search_keeps_the_largest_batch_that_fits():
    def attempt(b: int) -> dict:
        if b > 512:
            raise gpu.OutOfMemory(f"batch {b}")
        return {"batch": b}

    result, tried = gpu.search_batch((256, 2048, 512, 1024), attempt)
    assert result == {"batch": 512} and tried == [[2048, "oom"], [1024, "oom"]]
    with pytest.raises(gpu.OutOfMemory, match="no batch"):
        gpu.search_batch((2048, 1024), attempt)


class _FakeRunner(gpu.Runner):
    """Answers each command from `answer(args)` instead of running it; records the commands."""

    def __init__(self, answer):
        super().__init__(sys.executable, "gpu", budget_s=600)
        self.answer, self.calls = answer, []

    def run(self, args, jax_part, cap_s):
        self.calls.append(args)
        return self.answer(args)


def _flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def test_gpu_runs_use_bf16_and_cudnn_fall_back_to_xla_and_skip_batches_out_of_memory():
    def answer(args):
        b, impl = int(_flag(args, "config.batch_size")), _flag(args, "config.model.attention")
        if b > 1024:
            raise gpu.OutOfMemory("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        if impl == "cudnn":
            raise gpu.PartFailed("cuDNN does not support this attention shape")
        return json.dumps({"batch": b, "attention": impl, "images_per_s": 1.0, "step_ms": 1.0})

    runner = _FakeRunner(answer)
    out = gpu.jax_part(runner, gpu.GPU_PARTS["b16"], "train", 989.0, steps=10, smoke=False)
    assert out["batch"] == 1024 and out["attention"] == "xla" and out["oom_batches"] == [2048]
    first = runner.calls[0]
    assert _flag(first, "config.model.dtype") == "bfloat16" and _flag(first, "peak_tflops") == "989.0"
    assert _flag(first, "config") == "configs/base.py:B/16" and "--flops=lowered" in first


def test_a_failure_that_is_not_memory_ends_the_part(tmp_path):
    runner = gpu.Runner(sys.executable, "cpu", budget_s=60)
    oom = ["-c", "import sys; print('RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB'); sys.exit(1)"]
    with pytest.raises(gpu.OutOfMemory):
        runner.run(oom, jax_part=True, cap_s=30)
    with pytest.raises(gpu.PartFailed, match="ZeroDivisionError"):
        runner.run(["-c", "1 / 0"], jax_part=True, cap_s=30)


def test_a_part_past_its_time_is_killed_with_its_children(tmp_path):
    # bench.torch_step runs open_clip in a grandchild: a timeout must not leave it holding the GPU.
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
            "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)\n")  # fmt: skip
    runner = gpu.Runner(sys.executable, "cpu", budget_s=60)
    with pytest.raises(TimeoutError, match="ran past 3 s"):
        runner.run(["-c", code], jax_part=False, cap_s=3)
    pid = int(pid_file.read_text())
    for _ in range(50):  # the kernel reaps the killed grandchild (reparented to init) shortly
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} still runs")


def test_open_clips_report_is_read_and_its_batch_halved_until_it_fits():
    def answer(args):
        b = int(_flag(args, "config.batch_size"))
        assert _flag(args, "precision") == "bf16" and _flag(args, "device") == "cuda"
        if b > 256:
            raise gpu.OutOfMemory("torch.OutOfMemoryError: CUDA out of memory")
        return torch_step.report("open_clip 3.3.0 CLIP, B/16 sizes", b, [0.5, 0.5], 1.5, memory=3 * 2**30)

    out = gpu.open_clip_part(_FakeRunner(answer), "configs/base.py:B/16", 1024, steps=2)
    assert out["batch"] == 256 and out["oom_batches"] == [1024, 512]
    assert out["images_per_s"] == 512.0 and out["step_ms"] == 500.0 and out["peak_memory_bytes"] == 3 * 2**30


def test_open_clips_step_runs_under_bf16_autocast():
    if why := available():
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    config = defaults.get_config("tiny")
    config.batch_size = 2
    out = torch_step.run_open_clip(config, steps=1, device="cpu", precision="bf16")
    assert "bf16 autocast (matmuls in bfloat16)" in out and "images/s" in out


def test_the_eval_embedding_mode_runs_both_towers_forward():
    from veclip_jax.bench import step

    config = defaults.get_config("tiny")
    config.batch_size, config.model.dtype = 4, "bfloat16"
    out = step.embed_main(config)
    assert out["mode"] == "embed" and out["batch"] == 4 and out["images_per_s"] > 0 and out["flops"] > 0


@pytest.mark.slow
def test_the_whole_cpu_smoke_run():
    # Every default smoke part (our step, open_clip's, the eval embedding, the input pipeline).
    run = _script(BENCH_PLATFORM="cpu", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = _bench_json(run.stdout)
    assert set(out["parts"]) == set(gpu.SMOKE_DEFAULT)
    assert out["parts"]["embed"]["mode"] == "embed" and out["parts"]["input"]["records_per_s"]
    if not available():
        assert out["b16_vs_open_clip"] > 0
