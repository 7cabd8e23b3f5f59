"""launch/tpu.py: the gcloud commands it generates, and `run --watch` against a fake gcloud.

No cloud is reachable: the fake `gcloud` on the PATH (written here) logs its argv and plays a
queued resource's life: create -> WAITING_FOR_RESOURCES -> ACTIVE -> preempted (SUSPENDED) while
the command runs -> delete -> re-create -> ACTIVE -> the command exits 0.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from veclip_jax.cli import tpu
from veclip_jax.cli.tpu import Job

REPO = Path(__file__).resolve().parent.parent
B16 = dict(name="veclip-b16", accelerator="v5p-256", zone="us-east5-a", project="P",
           config="configs/vecap200m_b16.py", workdir="gs://bucket/vecap200m_b16")  # fmt: skip
COMMON = [f"--{k}={v}" for k, v in B16.items()] + ["--repo=https://example.com/veclip.git", "--commit=abc123"]

FAKE_GCLOUD = textwrap.dedent('''\
    #!{python}
    """A fake gcloud: logs argv, keeps the queued resource's state in a file, plays ssh outcomes."""
    import json, os, sys
    d = os.environ["FAKE_GCLOUD_DIR"]
    argv = sys.argv[1:]
    with open(os.path.join(d, "log.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\\n")
    state_file = os.path.join(d, "state")
    def read():
        return open(state_file).read() if os.path.exists(state_file) else None
    def write(s):
        open(state_file, "w").write(s)
    if argv[:3] == ["config", "get-value", "project"]:  # unset: gcloud prints (unset) on stderr
        project = os.environ.get("FAKE_GCLOUD_PROJECT")
        print(project) if project else print("(unset)", file=sys.stderr)
    elif "queued-resources" in argv:
        verb = argv[argv.index("queued-resources") + 1]
        if verb == "create":
            if read() is not None:
                sys.exit("ERROR: already exists")
            write("WAITING_FOR_RESOURCES")
        elif verb == "describe":
            s = read()
            if s is None:
                sys.exit("ERROR: NOT_FOUND")
            print(s)
            if s == "WAITING_FOR_RESOURCES":
                write("ACTIVE")  # granted by the next poll
            if s == "ACTIVE" and os.path.exists(state_file + ".late"):
                os.remove(state_file + ".late")
                write("SUSPENDED")  # the preemption shows one poll after ssh dropped
        elif verb == "delete":
            os.remove(state_file)
    elif "ssh" in argv:
        if read() != "ACTIVE":
            sys.exit(255)
        plays = json.load(open(os.path.join(d, "ssh_plays.json")))
        n = sum(1 for line in open(os.path.join(d, "log.jsonl")) if "ssh" in json.loads(line))
        play = plays[min(n, len(plays)) - 1]
        if play.get("preempt"):
            write("SUSPENDED")
        if play.get("late_preempt"):
            open(state_file + ".late", "w").close()
        sys.exit(play["rc"])
''')


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A directory with the fake gcloud on the PATH; returns a helper to set plays and read the log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(FAKE_GCLOUD.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))

    def plays(*outcomes: dict) -> None:
        (tmp_path / "ssh_plays.json").write_text(json.dumps(list(outcomes)))

    def log() -> list[list[str]]:
        path = tmp_path / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return SimpleNamespace(plays=plays, log=log, state=tmp_path / "state")


def _verb(argv: list[str]) -> str:
    return "ssh" if "ssh" in argv else argv[argv.index("queued-resources") + 1]


def test_create_command_per_generation_and_capacity():
    job = Job(**B16, spot=True)
    assert tpu.create_command(job) == [
        "gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "veclip-b16", "--project=P",
        "--zone=us-east5-a", "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5",
        "--node-id=veclip-b16", "--spot"]  # fmt: skip
    runtimes = {"v4-512": "tpu-ubuntu2204-base", "v5litepod-256": "v2-alpha-tpuv5-lite",
                "v6e-256": "v2-alpha-tpuv6e", "v5p-128": "v2-alpha-tpuv5"}  # fmt: skip
    for accelerator, runtime in runtimes.items():
        cmd = tpu.create_command(Job(**{**B16, "accelerator": accelerator}, reserved=True))
        assert f"--runtime-version={runtime}" in cmd and cmd[-1] == "--reserved" and "--spot" not in cmd


def test_multislice_nodes_hardware_and_one_ssh_per_slice():
    job = Job(**B16, num_slices=2, repo="R", commit="C")
    cmd = tpu.create_command(job)
    assert "--node-count=2" in cmd and "--node-prefix=veclip-b16" in cmd
    assert not any(a.startswith("--node-id") for a in cmd)
    assert job.hardware == "tpu-v5p-256-2" and job.nodes == ["veclip-b16-0", "veclip-b16-1"]
    assert "--config.hardware=tpu-v5p-256-2" in tpu.trainer_command(job)


def test_startup_installs_pinned_project_checks_devices_then_trains():
    job = Job(**B16, overrides=("--config.total_steps=10",), repo="https://x/veclip.git", commit="abc123")
    lines = tpu.startup_script(job).splitlines()
    pins = (REPO / "requirements.txt").read_text().splitlines()
    jax_pin = next(line for line in pins if line.startswith("jax=="))
    assert lines[0] == "set -euo pipefail"  # a failed step (device check: exit 2) stops the script
    order = ["git clone -q -- https://x/veclip.git", "git checkout -q --force abc123 --", "pip install -q -r",
             "pip install -q --no-deps -e .", f'pip install -q "jax[tpu]=={jax_pin[5:]}"',
             "python launch/tpu.py check-devices --hardware=tpu-v5p-256",
             "python launch/train.py"]  # fmt: skip
    found = [next(i for i, line in enumerate(lines) if step in line) for step in order]
    assert found == sorted(found), lines
    train = shlex.split(lines[-1].split(" 2>&1 ")[0])
    assert train == ["python", "launch/train.py", "--config=configs/vecap200m_b16.py",
                     "--workdir=gs://bucket/vecap200m_b16", "--distributed", "--config.hardware=tpu-v5p-256",
                     "--config.total_steps=10"]  # fmt: skip
    assert "torch" not in lines[lines.index(next(x for x in lines if "grep -vE" in x))].split(">")[-1]
    assert any(line.startswith("pip install -q gcsfs") for line in lines)  # gs:// workdir: epath needs it
    script = tpu.startup_script(job)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    local = Job(**{**B16, "workdir": "/mnt/run"}, repo="R", commit="C")
    assert "gcsfs" not in tpu.startup_script(local)


def test_check_devices_exit_code():
    def chips(n: int, kind: str = "TPU v5") -> list:
        return [SimpleNamespace(device_kind=kind, coords=(i, 0, 0)) for i in range(n)]

    assert tpu.check_devices_main("tpu-v5p-256", devices=chips(128)) == 0
    assert tpu.check_devices_main("tpu-v5p-256", devices=chips(64)) == 2  # half the pod
    assert tpu.check_devices_main("tpu-v5p-256", devices=chips(128, "TPU v4")) == 2


def test_dry_run_prints_every_command_and_runs_none(fake_gcloud, capsys):
    assert tpu.main(["run", *COMMON, "--spot", "--dry_run", "--", "--config.seed=3"]) == 0
    out = capsys.readouterr().out
    commands = [shlex.split(chunk) for chunk in out.strip().removeprefix("$ ").split("\n$ ")]
    assert [_verb(c) for c in commands] == ["create", "describe", "ssh"]
    assert commands[2][-1].endswith("--config.seed=3 2>&1 | tee -a ~/veclip-logs/veclip-b16.log")
    assert fake_gcloud.log() == []  # nothing ran
    for action in ("create", "status", "logs", "delete"):
        assert tpu.main([action, *COMMON, "--dry_run"]) == 0
        assert capsys.readouterr().out.startswith("$ gcloud ")
    assert fake_gcloud.log() == []


def test_run_watch_survives_a_preemption(fake_gcloud, capsys):
    fake_gcloud.plays({"rc": 255, "preempt": True}, {"rc": 0})
    sleeps: list[float] = []
    rc = tpu.main(["run", *COMMON, "--spot", "--watch", "--poll_s=5"], sleep=sleeps.append)
    assert rc == 0
    log = fake_gcloud.log()
    assert [_verb(a) for a in log] == [
        "describe", "create", "describe", "describe", "ssh",  # absent -> create -> waiting -> ACTIVE -> run
        "describe", "describe", "delete", "create", "describe", "describe", "ssh"]  # preempted -> again
    ssh = [a for a in log if "ssh" in a]
    assert ssh[0] == ssh[1] and "--worker=all" in ssh[0]  # the same command: it resumes from the workdir
    assert "--workdir=gs://bucket/vecap200m_b16 --distributed --config.hardware=tpu-v5p-256" in ssh[0][-1]
    assert sleeps == [5, 5]
    assert "SUSPENDED while training" in capsys.readouterr().out


def test_run_without_watch_or_on_an_active_slice_returns_the_exit_code(fake_gcloud):
    fake_gcloud.plays({"rc": 255, "preempt": True}, {"rc": 0})
    assert tpu.main(["run", *COMMON, "--spot", "--poll_s=0"], sleep=lambda s: None) == 255
    assert sum("ssh" in a for a in fake_gcloud.log()) == 1
    fake_gcloud.state.unlink()
    fake_gcloud.plays({"rc": 0}, {"rc": 2})  # play 2: a config error on a live slice
    assert tpu.main(["run", *COMMON, "--watch", "--poll_s=0"], sleep=lambda s: None) == 2
    assert sum("ssh" in a for a in fake_gcloud.log()) == 2  # not re-run: re-running would not help


def test_usage_errors_exit_2(capsys):
    assert tpu.main(["run", *COMMON, "--accelerator=h100-32", "--dry_run"]) == 2
    assert tpu.main(["run", *[a for a in COMMON if not a.startswith("--zone")], "--dry_run"]) == 2
    assert tpu.main(["run", *COMMON, "--config=configs/nope.py", "--dry_run"]) == 2
    assert "configs/nope.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpu.main(["run", *COMMON, "--spot", "--reserved"])


def test_launch_script_is_thin():
    proc = subprocess.run([sys.executable, "launch/tpu.py", "status", *COMMON, "--dry_run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("$ gcloud alpha compute tpus queued-resources describe veclip-b16")


def test_run_watch_looks_again_when_ssh_drops_before_the_state_changes(fake_gcloud):
    fake_gcloud.plays({"rc": 255, "late_preempt": True}, {"rc": 0})
    sleeps: list[float] = []
    assert tpu.main(["run", *COMMON, "--spot", "--watch", "--poll_s=7"], sleep=sleeps.append) == 0
    verbs = [_verb(a) for a in fake_gcloud.log()]
    assert verbs[4:9] == ["ssh", "describe", "describe", "describe", "delete"]  # ACTIVE, then SUSPENDED
    assert verbs.count("ssh") == 2 and sleeps == [7, 7, 7]
    fake_gcloud.state.unlink()
    fake_gcloud.plays({"rc": 0}, {"rc": 0}, {"rc": 255})  # ssh fails on a slice that stays ACTIVE
    assert tpu.main(["run", *COMMON, "--watch", "--poll_s=0"], sleep=lambda s: None) == 255


def test_the_name_reaches_the_workers_only_as_a_resource_name(fake_gcloud, capsys):
    for name in ["x; touch /tmp/pwned", "x$(id)", "-x", "X", "a" * 64, "x\n"]:
        for action in ("run", "logs", "create"):
            assert tpu.main([action, *COMMON, f"--name={name}", "--dry_run"]) == 2, (action, name)
            assert "--name" in capsys.readouterr().err
    assert fake_gcloud.log() == []
    with pytest.raises(tpu.UserError, match="--name"):  # the script refuses it too, whoever built the Job
        tpu.startup_script(Job(**{**B16, "name": "x;id"}, repo="R", commit="C"))
    assert Job(**{**B16, "name": "x;id"}).log_file == "~/veclip-logs/'x;id.log'"  # quoted all the same
    assert tpu.main(["logs", *COMMON, "--dry_run"]) == 0
    assert capsys.readouterr().out.strip().endswith("'--command=tail -n 200 ~/veclip-logs/veclip-b16.log'")


def test_repo_and_commit_cannot_be_read_as_git_options(fake_gcloud, capsys):
    for flag in ("--repo=--upload-pack=touch /tmp/pwned", "--commit=--orphan=x", "--commit=-p"):
        assert tpu.main(["run", *COMMON, flag, "--dry_run"]) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag.split('=')[0]}=") and "read as an option" in err, err
    lines = tpu.startup_script(Job(**B16, repo="https://x/v.git", commit="abc123")).splitlines()
    clone = next(line for line in lines if "git clone" in line)
    assert "git clone -q -- https://x/v.git ~/veclip-jax" in clone  # `--`: the URL is never an option
    checkout = next(line for line in lines if "git checkout" in line)
    assert checkout.endswith("git checkout -q --force abc123 --")  # `--`: a revision, never a path
    assert fake_gcloud.log() == []


@pytest.mark.parametrize("accelerator", ["v5p-256\n", "v5p-256 ", "v5p-256\nid", " v5p-256", "V5P-256"])
def test_an_accelerator_is_matched_in_full(accelerator, capsys):
    assert tpu.main(["create", *COMMON, f"--accelerator={accelerator}", "--dry_run"]) == 2
    assert "--accelerator" in capsys.readouterr().err


def test_project_defaults_to_gclouds_configured_project(fake_gcloud, monkeypatch, capsys):
    no_project = [a for a in COMMON if not a.startswith("--project")]
    monkeypatch.setenv("FAKE_GCLOUD_PROJECT", "from-config")
    assert tpu.main(["status", *no_project]) == 0
    out = capsys.readouterr()
    assert out.out == "NOT_FOUND\n" and "--project=from-config (gcloud's configured project)" in out.err
    log = fake_gcloud.log()
    assert log[0] == ["config", "get-value", "project"] and "--project=from-config" in log[1]
    assert tpu.main(["create", *no_project, "--dry_run"]) == 0  # a dry run reads the setting too
    assert "--project=from-config" in capsys.readouterr().out
    monkeypatch.delenv("FAKE_GCLOUD_PROJECT")
    assert tpu.main(["create", *no_project]) == 2
    assert "--project: not given, and gcloud has no configured project" in capsys.readouterr().err
    assert [_verb(a) if "config" not in a else "config" for a in fake_gcloud.log()].count("create") == 0
    assert tpu.main(["create", *no_project, "--dry_run"]) == 0  # a dry run shows where it would go
    assert "--project=PROJECT" in capsys.readouterr().out
    monkeypatch.setenv("PATH", "/nonexistent")  # no gcloud at all: the same one line
    assert tpu.main(["create", *no_project]) == 2
    assert "--project: not given" in capsys.readouterr().err
