"""Issue 24 #5: `make_dataset.py --ray_address` writes the converter's shards as Ray tasks.

One local Ray (2 CPUs) for the module; the CLI finds it initialised and uses it. Guarantees: the
shards are byte for byte, and the summary (timings aside) equal to a local --workers=1 run's; a
rerun on Ray resumes (done shards untouched, a deleted one remade identically); a failing shard
ends the command with the usual one line, no Ray traceback, no temporary file; --num_tasks and
--task_index are refused with --ray_address; a worker that does not see the driver's output
refuses to write. Every Ray test runs under a hard deadline (SIGALRM) so a hang fails.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.helpers import deadline
from veclip_jax.cli import make_dataset
from veclip_jax.data import convert, convert_run, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TARS, NUM_SHARDS = 4, 3


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    with deadline(120, "ray.init"):
        # log_to_driver off: worker start-up chatter must not reach the CLI's captured stderr.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _guard():
    with deadline(150, "this test"):
        yield


def _image(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """4 tars of 3 samples (one with an undecodable image, one without a caption) and a VeCap JSON."""
    root = tmp_path_factory.mktemp("inputs")
    vecap = {}
    for t in range(NUM_TARS):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for i in range(3):
                key, url = f"{t:04d}{i:04d}", f"http://x.org/{t}/{i}.jpg"
                image = b"not a jpeg" if (t, i) == (1, 2) else _image(10 * t + i)
                members = {"jpg": image, "json": json.dumps({"url": url}).encode()}
                if (t, i) != (2, 0):
                    members["txt"] = f"alt text {t} {i}".encode()
                if i != 1:
                    vecap[url] = f"a visual caption of image {t} {i}"
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "vecap.json").write_text(json.dumps(vecap))
    return {"tars": str(root / "{00000..00003}.tar"), "vecap": str(root / "vecap.json")}


def _cli(capsys, inputs, out, *more: str) -> tuple[int, str]:
    argv = [f"--webdataset={inputs['tars']}", f"--vecap_json={inputs['vecap']}", f"--out={out}",
            f"--num_shards={NUM_SHARDS}", "--source=t", *more]  # fmt: skip
    code = make_dataset.main(argv)
    return code, capsys.readouterr().err


def _shard_bytes(out: str) -> list[bytes]:
    return [open(records.shard_name(out, j, NUM_SHARDS), "rb").read() for j in range(NUM_SHARDS)]


def _comparable(out: str) -> dict:
    """OUT.stats.json without what differs between two equal conversions: timings, the output's name."""
    with open(convert.stats_path(out)) as f:
        summary = json.load(f)
    for key in ("seconds", "out", "stats_path"):
        summary.pop(key)
    for shard in summary["shards"]:
        shard.pop("seconds")
    return summary


def _one_line(code: int, err: str, want_code: int, message: str) -> None:
    lines = [line for line in err.splitlines() if not line[:2].isdigit()]  # log lines start HH:MM:SS
    assert code == want_code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and "RayTaskError" not in err, err


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local") / "train")
    convert.convert_webdataset(inputs["tars"], out, NUM_SHARDS, vecap_json=inputs["vecap"], source="t")
    return out  # workers=1: in this process


def test_ray_shards_and_summary_equal_a_local_run_byte_for_byte(ray_cluster, inputs, local_run, tmp_path,
                                                                 capsys):  # fmt: skip
    out = str(tmp_path / "train")
    code, err = _cli(capsys, inputs, out, "--ray_address=auto")  # the module's Ray is used as it is
    assert code == 0, err
    assert _shard_bytes(out) == _shard_bytes(local_run)
    summary = _comparable(out)
    assert summary == _comparable(local_run)
    assert summary["records"] == 11 and summary["skipped"] == {"undecodable_image": 1}
    assert summary["vecap_joined"] == 7 and summary["written"] == NUM_SHARDS
    left = [n for d, _, fs in os.walk(tmp_path) for n in fs if ".tmp" in n or "vecap-index" in n]
    assert not left, left  # no temporary file, and the VeCap index removed once every shard is done


def test_a_rerun_on_ray_resumes_keeping_done_shards(ray_cluster, inputs, local_run, tmp_path, capsys):
    out = str(tmp_path / "train")
    assert _cli(capsys, inputs, out, "--ray_address=auto")[0] == 0
    kept = [os.stat(records.shard_name(out, j, NUM_SHARDS)).st_mtime_ns for j in (0, 2)]
    os.remove(records.shard_name(out, 1, NUM_SHARDS))
    code, err = _cli(capsys, inputs, out, "--ray_address=auto", "--workers=1")  # at most 1 in flight
    assert code == 0, err
    with open(convert.stats_path(out)) as f:
        summary = json.load(f)
    assert (summary["written"], summary["reused"]) == (1, 2)
    assert [os.stat(records.shard_name(out, j, NUM_SHARDS)).st_mtime_ns for j in (0, 2)] == kept
    assert _shard_bytes(out) == _shard_bytes(local_run)


def test_a_failing_shard_on_ray_is_the_usual_one_line_error(ray_cluster, inputs, tmp_path, capsys):
    out = str(tmp_path / "out" / "train")
    # A directory where shard 1's stats file goes: write_shard fails on the Ray worker, not here.
    os.makedirs(convert_run.shard_stats_path(out, 1, NUM_SHARDS))
    code, err = _cli(capsys, inputs, out, "--ray_address=auto")
    _one_line(code, err, 2, "Is a directory")
    left = [n for d, _, fs in os.walk(tmp_path) for n in fs if ".tmp" in n]
    assert not left, left
    assert not os.path.exists(records.shard_name(out, 1, NUM_SHARDS))


def test_hand_run_task_flags_are_refused_with_ray(inputs, tmp_path, capsys):
    cases = [
        (["--num_tasks=2", "--task_index=1"], "drop --num_tasks and --task_index"),
        (["--num_tasks=1"], "drop --num_tasks ("),  # refused even at its default value
        (["--task_index=0"], "drop --task_index ("),
    ]
    for more, named in cases:
        code, err = _cli(capsys, inputs, str(tmp_path / "t"), "--ray_address=local", *more)
        _one_line(code, err, 2, named)
    assert not os.path.exists(tmp_path / "t.lock")  # refused before anything is made
    code, err = _cli(capsys, inputs, str(tmp_path / "t"), "--ray_address=")
    _one_line(code, err, 2, "--ray_address is empty")


def test_a_worker_that_does_not_share_the_output_refuses_to_write(inputs, tmp_path, monkeypatch):
    out = str(tmp_path / "train")
    jobs_seen = []
    # The jobs the driver would send, without a cluster (no stats come back: the summary fails).
    monkeypatch.setattr(convert_run, "_run_on_ray", lambda pending, *args: jobs_seen.extend(pending))
    with pytest.raises(KeyError):
        convert.convert_webdataset(inputs["tars"], out, NUM_SHARDS, ray_address="auto")
    job = jobs_seen[0]
    driver = json.dumps({"host": "driver", "pid": 1})
    with pytest.raises(convert.ConversionError, match="every node of the Ray cluster mounts at the same"):
        convert_run._write_shard_on_node(job, convert_run.lock_path(out), driver)  # this "node" sees another
    assert not os.path.exists(job.path)
    stats = convert_run._write_shard_on_node(job, convert_run.lock_path(out), "")  # no lock holder: no check
    assert stats["records"] == 6  # tars 0 and 3


@pytest.mark.slow
def test_ray_address_local_starts_its_own_ray_from_the_command_line(inputs, local_run, tmp_path):
    # A fresh process with nothing started: `local` brings up a Ray for the command and shuts it down.
    out = str(tmp_path / "train")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "make_dataset.py"), f"--webdataset={inputs['tars']}",
           f"--vecap_json={inputs['vecap']}", f"--out={out}", f"--num_shards={NUM_SHARDS}", "--source=t",
           "--ray_address=local"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _shard_bytes(out) == _shard_bytes(local_run)
    assert _comparable(out) == _comparable(local_run)
    shutil.rmtree(tmp_path)
