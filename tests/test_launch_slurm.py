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


def _sbatch_argv(script: str) -> list[str]:
    """The #SBATCH header as sbatch reads it: a port of src/sbatch/opt.c `_get_argument` (SLURM 18+).

    Quotes (' or ") group, a backslash escapes the next character even inside
    quotes, an unquoted # starts a comment; the header ends at the first line
    that is neither a comment nor blank.
    """
    argv: list[str] = []
    for line in script.split("\n")[1:]:
        if line.strip() and not line.startswith("#"):
            break  # sbatch stops reading directives at the first command
        if not line.startswith("#SBATCH"):
            continue
        rest, i = line[len("#SBATCH") :], 0
        while i < len(rest):
            while i < len(rest) and rest[i].isspace():
                i += 1
            arg, quote, escaped = "", "", False
            while i < len(rest) and (quote or not rest[i].isspace()):
                c = rest[i]
                i += 1
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                    continue
                elif quote:
                    if c == quote:
                        quote = ""
                        continue
                elif c in "'\"":
                    quote = c
                    continue
                elif c == "#":
                    i = len(rest)
                    break
                arg += c
            assert not quote, f"unmatched quote in {line!r}"
            if arg:
                argv.append(arg)
    return argv


def test_header_values_are_quoted_as_sbatch_reads_them(tmp_path):
    chdir = tmp_path / "my repo #1"
    (chdir / "configs").mkdir(parents=True)
    (chdir / "configs" / "vecap200m_b16.py").write_text("")
    odd = "a b'c\"d\\e#f$(touch x)"
    assert slurm.main(_args(tmp_path, f"--chdir={chdir}", f"--partition={odd}", f"--account={odd}",
                            "--time=1-00:00:00", "--dry_run")) == 0  # fmt: skip
    script = (tmp_path / "job.sbatch").read_text()
    argv = _sbatch_argv(script)
    assert f"--chdir={chdir}" in argv and f"--partition={odd}" in argv and f"--account={odd}" in argv
    assert f"--output={tmp_path}/logs/%x-%j.out" in argv and "--time=1-00:00:00" in argv
    assert argv[-1] == f"--account={odd}" and len(argv) == 13  # every directive read, none added
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0


def test_a_newline_in_any_value_is_refused_and_nothing_runs(tmp_path, capsys):
    for flag in ["--job_name", "--partition", "--account", "--time", "--signal", "--chdir", "--workdir",
                 "--config", "--venv", "--log_dir"]:  # fmt: skip
        assert slurm.main(_args(tmp_path, f"{flag}=x\ntouch {tmp_path}/pwned", "--dry_run")) == 2, flag
        assert f"{flag}: control character '\\n'" in capsys.readouterr().err, flag
    assert slurm.main([*_args(tmp_path, "--dry_run"), "--", "--config.seed=1\r"]) == 2
    assert "control character '\\r'" in capsys.readouterr().err
    assert not (tmp_path / "job.sbatch").exists() and not (tmp_path / "pwned").exists()


def test_a_job_name_that_is_a_path_is_refused(tmp_path, capsys):
    logs = tmp_path / "deep" / "logs"
    for name in ["../../x", "a/b", "..", ".hidden", "x y", ""]:
        args = ["--nodes=1", "--config=configs/vecap200m_b16.py", "--workdir=/w", f"--log_dir={logs}",
                f"--job_name={name}", "--dry_run"]  # fmt: skip
        assert slurm.main(args) == 2, name
        assert "--job_name" in capsys.readouterr().err
    assert not (tmp_path / "x.sbatch").exists() and not logs.exists()
    assert slurm.main(["--nodes=1", "--config=configs/vecap200m_b16.py", "--workdir=/w", f"--log_dir={logs}",
                       "--job_name=clip-b16_v2.1", "--dry_run"]) == 0  # fmt: skip
    assert os.listdir(logs) == ["clip-b16_v2.1.sbatch"]
