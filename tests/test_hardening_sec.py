"""Issue 22's security cases on files a run writes or reads: each refused or cleaned, nothing else touched.

The workdir lock (a symlink, a dangling link, a FIFO, a hard link planted as
WORKDIR/.lock), the HF shard index (entries outside the model directory, a
shard that is not safetensors) and the temporaries a killed export leaves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from veclip_jax.errors import UserError
from veclip_jax.run.workdir import LOCK_FILE, WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")


# --- #1: the workdir lock never follows a link ---------------------------------------------------


def _victim(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    workdir = tmp_path / "run"
    workdir.mkdir()
    return workdir, victim


def test_a_lock_symlinked_to_another_file_is_refused_and_the_file_untouched(tmp_path):
    workdir, victim = _victim(tmp_path)
    (workdir / LOCK_FILE).symlink_to(victim)
    with pytest.raises(UserError, match=rf"{LOCK_FILE} is not a plain lock file \(a symlink\)"):
        WorkdirLock(str(workdir)).acquire()
    assert victim.read_text() == "keep me"


def test_a_dangling_lock_symlink_does_not_create_its_target(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    target = tmp_path / "created-by-the-trainer"
    (workdir / LOCK_FILE).symlink_to(target)
    with pytest.raises(UserError, match="a symlink"):
        WorkdirLock(str(workdir)).acquire()
    assert not os.path.lexists(target)


def test_a_lock_hard_linked_to_another_file_is_refused_and_the_file_untouched(tmp_path):
    workdir, victim = _victim(tmp_path)
    os.link(victim, workdir / LOCK_FILE)
    with pytest.raises(UserError, match="a hard link to another file"):
        WorkdirLock(str(workdir)).acquire()
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (os.mkfifo if kind == "fifo" else os.mkdir)(workdir / LOCK_FILE)
    with pytest.raises(UserError, match=f"{LOCK_FILE} is not a plain lock file"):
        WorkdirLock(str(workdir)).acquire()  # and does not hang on the FIFO


def test_release_truncates_only_the_lock_it_took(tmp_path):
    workdir, victim = _victim(tmp_path)
    lock = WorkdirLock(str(workdir)).acquire()
    assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()
    # The lock file swapped for a link while held: release truncates the file it
    # locked (by descriptor), never what the path now names.
    os.replace(workdir / LOCK_FILE, tmp_path / "old-lock")
    (workdir / LOCK_FILE).symlink_to(victim)
    lock.release()
    assert victim.read_text() == "keep me"
    assert (tmp_path / "old-lock").read_text() == ""
    WorkdirLock(str(tmp_path / "other")).release()  # never acquired: touches nothing
    assert not (tmp_path / "other").exists()


def test_the_trainer_cli_exits_2_naming_a_symlinked_lock(demo_cache, tmp_path):
    workdir, victim = _victim(tmp_path)
    (workdir / LOCK_FILE).symlink_to(victim)
    out = subprocess.run([sys.executable, TRAIN, "--config=configs/tiny.py", f"--workdir={workdir}",
                          f"--config.data.cache_dir={demo_cache}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "is not a plain lock file (a symlink)" in out.stderr and "Traceback" not in out.stderr
    assert victim.read_text() == "keep me"


# --- #17: a HF shard index names files in its directory, safetensors only ---------------------------


def _shards(tmp_path):
    """A model directory with two real shards (and a valid safetensors file outside it)."""
    from safetensors.numpy import save_file

    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": np.zeros(2, np.float32)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones(3, np.float32)}, str(d / "model-00002-of-00002.safetensors"))
    save_file({"secret": np.full(4, 7, np.float32)}, str(tmp_path / "outside.safetensors"))
    return d


def _index(d, *names):
    weight_map = {f"t{i}": name for i, name in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_sharded_hf_directory_loads_including_hub_cache_symlinks(tmp_path):
    from veclip_jax.hf.from_hf import load_hf_state_dict

    d = _shards(tmp_path)
    _index(d, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    assert sorted(load_hf_state_dict(str(d))) == ["a", "b"]
    # the HF hub cache: snapshots/REV/NAME -> ../../blobs/HASH, outside the directory by design
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    os.replace(d / "model-00002-of-00002.safetensors", blobs / "abc123")
    (d / "model-00002-of-00002.safetensors").symlink_to(os.path.relpath(blobs / "abc123", d))
    assert sorted(load_hf_state_dict(str(d))) == ["a", "b"]


@pytest.mark.parametrize("entry", ["../outside.safetensors", "{tmp}/outside.safetensors",
                                   "sub/../../outside.safetensors", "sub/x.safetensors"])  # fmt: skip
def test_a_shard_index_entry_outside_the_model_directory_is_refused(tmp_path, entry):
    from veclip_jax.hf.from_hf import load_hf_state_dict

    d = _shards(tmp_path)
    (d / "sub").mkdir()
    entry = entry.format(tmp=tmp_path)
    _index(d, "model-00001-of-00002.safetensors", entry)
    with pytest.raises(UserError, match=rf"weight_map entry '{re.escape(entry)}' is not a file name in"):
        load_hf_state_dict(str(d))


@pytest.mark.parametrize("case", ["bin", "garbage", "missing", "directory", "not-json", "no-weight-map",
                                  "not-a-name"])  # fmt: skip
def test_a_shard_that_is_not_safetensors_is_a_user_error_naming_it(tmp_path, case):
    from veclip_jax.hf.from_hf import load_hf_state_dict

    d = _shards(tmp_path)
    index = d / "model.safetensors.index.json"
    name = {"bin": "pytorch_model-00001-of-00002.bin", "garbage": "garbage.safetensors",
            "directory": "dir.safetensors", "missing": "missing.safetensors"}.get(case, "")  # fmt: skip
    _index(d, "model-00001-of-00002.safetensors", name or "model-00002-of-00002.safetensors")
    (d / "pytorch_model-00001-of-00002.bin").write_bytes(b"\x80\x02torch pickle")
    (d / "garbage.safetensors").write_bytes(b"\x80\x02torch pickle")
    (d / "dir.safetensors").mkdir()
    if case == "not-json":
        index.write_text("{")
    elif case == "no-weight-map":
        index.write_text("{}")
    elif case == "not-a-name":
        index.write_text(json.dumps({"weight_map": {"a": 3}}))
    with pytest.raises(UserError) as e:
        load_hf_state_dict(str(d))
    assert isinstance(e.value, ValueError)  # launch/eval.py reports ValueErrors in one line (exit 2)
    assert (name or "model.safetensors.index.json") in str(e.value)
    if case == "bin":  # refused by its name, never opened (a PyTorch pickle is not read)
        assert "is not a .safetensors file (only safetensors shards are read" in str(e.value)


def test_the_eval_cli_exits_2_naming_a_shard_outside_the_model(tmp_path, demo_cache):
    from tests.helpers import tiny_run_config
    from veclip_jax.data.demo import ensure_demo_data
    from veclip_jax.hf.to_hf import hf_config

    d = _shards(tmp_path)
    hf_config(tiny_run_config("").model).save_pretrained(str(d))
    _index(d, "../outside.safetensors")
    out = subprocess.run([sys.executable, "launch/eval.py", f"--model={d}", "--tasks=demo",
                          f"--tokenizer={ensure_demo_data(demo_cache).tokenizer}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "weight_map entry '../outside.safetensors'" in out.stderr and "Traceback" not in out.stderr


# --- #21: a killed export's temporary is removed by the next export, and nothing else -----------------


KILLED_EXPORT = """
import os, signal, sys
from tests.helpers import tiny_run_config
from veclip_jax.hf import to_hf

def killed(*args, **kwargs):  # config.json is written: kill -9 halfway through the export
    print("killed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

to_hf.params_to_hf = killed
to_hf.save_hf_directory(sys.argv[1], {}, tiny_run_config("").model, None)
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_exports_temporary_is_removed_by_the_next_export(tmp_path, demo_cache):
    import flax
    import jax

    from tests.helpers import tiny_run_config
    from veclip_jax.data.demo import ensure_demo_data
    from veclip_jax.data.tokenizer import Tokenizer
    from veclip_jax.hf.to_hf import save_hf_directory
    from veclip_jax.objectives.model import build, init_params

    out = tmp_path / "hf"
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9 and killed.stdout == "killed\n", killed.stderr[-3000:]
    left = [name for name in os.listdir(tmp_path) if name.startswith(".hf.export-")]
    assert len(left) == 1 and os.listdir(tmp_path / left[0]) == ["config.json"]  # what the kill left

    cfg = tiny_run_config("").model
    params = jax.tree.map(np.asarray, flax.linen.unbox(jax.jit(lambda r: init_params(build(cfg), r))(
        jax.random.key(0))))  # fmt: skip
    t = cfg.text
    spm = ensure_demo_data(demo_cache).tokenizer
    tok = Tokenizer(spm, t.context_length, pad_id=t.pad_id, eos_id=t.eos_id)
    save_hf_directory(str(out), params, cfg, tok)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_only_this_outputs_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    from veclip_jax.hf.to_hf import _host, remove_stale_temporaries

    out, host, dead = str(tmp_path / "hf"), _host(), _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".hf.export-{host}-{dead}.abcd_123": True,  # ours, writer gone
            f".hf.export-{host}-{live.pid}.abcd_123": False,  # a live export
            f".hf.export-{host}-{os.getpid()}.abcd_123": False,  # this process
            f".hf.export-other-host-{dead}.abcd_123": False,  # another host (a shared filesystem)
            f".other.export-{host}-{dead}.abcd_123": False,  # another output's
            f".hf.export-{host}-{dead}.abcd_1234": False,  # not mkdtemp's name
            f"hf.export-{host}-{dead}.abcd_123": False,  # not hidden: not ours
            ".hf.abcd_123": False,  # an older version's: only logged
        }
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "keep").write_text("x")
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "keep").write_text("x")
        link = tmp_path / f".hf.export-{host}-{dead}.linktoit"  # a symlink to a directory: never followed
        link.symlink_to(victim)
        a_file = tmp_path / f".hf.export-{host}-{dead}.afile123"
        a_file.write_text("x")  # a file: not ours
        removed = remove_stale_temporaries(out)
    finally:
        live.kill()
        live.wait()
    assert removed == [str(tmp_path / name) for name, gone in names.items() if gone]
    for name, gone in names.items():
        assert (tmp_path / name).exists() != gone, name
    assert (victim / "keep").exists() and link.is_symlink() and a_file.exists()
