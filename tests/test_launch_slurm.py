"""launch/slurm.py: the sbatch script it writes, and its submission through a fake `sbatch`."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

from veclip_jax.cli import slurm

REPO = Path(__file__).resolve().parent.parent


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--nodes=4", "--gpus_per_node=8", "--config=configs/vecap200m_b16.py",
            "--workdir=/shared/ckpt/b16", f"--log_dir={tmp_path}/logs", f"--script={tmp_path}/job.sbatch",
            *extra]  # fmt: skip


def _sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_writes_the_script(tmp_path, capsys):
    assert slurm.main([*_args(tmp_path, "--partition=gpu", "--dry_run"), "--", "--config.seed=3"]) == 0
    script = (tmp_path / "job.sbatch").read_text()
    assert capsys.readouterr().out == f"# {tmp_path}/job.sbatch\n{script}$ sbatch {tmp_path}/job.sbatch\n"
    header = _sbatch_lines(script)
    for want in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=TERM@120",
                 "--open-mode=append", f"--output={tmp_path}/logs/%x-%j.out", "--partition=gpu"]:  # fmt: skip
        assert want in header, (want, header)
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    assert shlex.split(srun[0]) == [
        "srun", "--kill-on-bad-exit=1", "python", "launch/train.py", "--config=configs/vecap200m_b16.py",
        "--workdir=/shared/ckpt/b16", "--distributed", "--config.hardware=gpu-h100-32",
        "--config.seed=3"]  # fmt: skip
    assert script.splitlines()[0] == "#!/bin/bash" and "set -euo pipefail" in script
    # bash accepts it (syntax only)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0


def test_hardware_follows_the_cluster_and_no_requeue(tmp_path):
    assert slurm.main(_args(tmp_path, "--nodes=2", "--no-requeue", "--dry_run")) == 0
    script = (tmp_path / "job.sbatch").read_text()
    assert "--config.hardware=gpu-h100-16" in script and "--no-requeue" in _sbatch_lines(script)
    assert "--nodes=2" in _sbatch_lines(script)


def test_submits_through_sbatch(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!{sys.executable}\nimport shutil, sys\n"
                    f"shutil.copy(sys.argv[1], {str(tmp_path / 'submitted')!r})\n"
                    "print('Submitted batch job 42')\n")  # fmt: skip
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert slurm.main(_args(tmp_path)) == 0
    assert capsys.readouterr().out == "Submitted batch job 42\n"
    assert (tmp_path / "submitted").read_text() == (tmp_path / "job.sbatch").read_text()


def test_usage_errors_exit_2(tmp_path, capsys):
    assert slurm.main(_args(tmp_path, "--config=configs/nope.py", "--dry_run")) == 2
    assert slurm.main(_args(tmp_path, "--gpu=a100", "--dry_run")) == 2
    assert "a100" in capsys.readouterr().err
    assert not (tmp_path / "job.sbatch").exists()


def test_launch_script_is_thin(tmp_path):
    proc = subprocess.run([sys.executable, "launch/slurm.py", *_args(tmp_path, "--dry_run")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "srun --kill-on-bad-exit=1 python launch/train.py" in proc.stdout
