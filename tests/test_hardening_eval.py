"""launch/eval.py on a full disk (issue 22, #7): the table is printed, no partial file is left, exit 1.

The disk is "full" for the output directory only: a sitecustomize in the
child process makes every rename into it fail with ENOSPC, as a write to a
full disk does (the atomic writer writes a temporary sibling, then renames).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FULL_DISK = """
import errno, os
_replace = os.replace

def replace(src, dst, *args, **kwargs):
    if os.fspath(dst).startswith(os.environ["FULL_DISK_UNDER"]):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(dst))
    return _replace(src, dst, *args, **kwargs)

os.replace = replace
"""


def test_eval_on_a_full_disk_prints_the_table_leaves_no_partial_file_and_exits_1(tiny_run, tmp_path):
    workdir, _ = tiny_run
    out = tmp_path / "out"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FULL_DISK)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               FULL_DISK_UNDER=str(out))  # fmt: skip
    cmd = [sys.executable, os.path.join(ROOT, "launch", "eval.py"), f"--model={workdir}",
           "--tasks=demo_color", f"--output_dir={out}", "--batch_size=16"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    assert any(line.startswith("| model") for line in run.stdout.splitlines())  # the results, shown first
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in run.stderr
    assert [f for f in os.listdir(out) if not f.startswith(".")] == []  # no 0-byte or partial JSON


# --- evaluation folders and flags (issue 22, #18) --------------------------------------------------


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    from PIL import Image

    from veclip_jax.eval.datasets import DatasetError, image_folder

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "1.png")
    with pytest.raises(DatasetError, match=r"class folder\(s\) dog .* hold no images"):
        image_folder(str(tmp_path))


def test_a_probe_whose_hold_out_leaves_one_class_blames_the_hold_out():
    import numpy as np

    from veclip_jax.eval.linear_probe import linear_probe

    x = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"holding out 50% .* left one class to fit"):
        linear_probe(x, np.array([0, 1]), x, np.array([0, 1]), 2, val_fraction=0.5)
    with pytest.raises(ValueError, match="images of one class"):
        linear_probe(x, np.array([1, 1]), x, np.array([0, 1]), 2)


def test_two_tasks_with_one_result_name_are_refused():
    from veclip_jax.eval.run import task_entries

    with pytest.raises(ValueError, match=r"'folder:/a/test' and 'folder:/b/test' both name their results"):
        task_entries(["folder:/a/test", "folder:/b/test"], None)


def test_a_zero_batch_size_names_the_flag(tiny_run):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "eval.py"), f"--model={tiny_run[0]}",
           "--batch_size=0"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: --batch_size=0")


# --- output that matters (issue 22, #20) -------------------------------------------------------------


def test_load_prints_no_library_notes(tiny_run):
    code = f"import veclip_jax; veclip_jax.load({tiny_run[0]!r}).encode_text(['a'])"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "absl" not in run.stderr and "read_only" not in run.stderr, run.stderr


def test_a_full_disk_during_training_ends_in_a_few_lines_with_the_one_that_matters(demo_cache, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a small filesystem here (not root)")
    try:
        cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
               f"--workdir={small / 'w'}", f"--config.data.cache_dir={demo_cache}", "--config.total_steps=8",
               "--config.checkpoint_every=2", "--config.eval_every=0"]  # fmt: skip
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert "Event loop is closed" not in run.stderr and "Traceback" not in run.stderr
    assert len(lines) < 40, run.stderr  # was ~480 lines: 88 tracebacks around the one below
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "intact" in errors[0]


def test_library_errors_print_one_line_each_once():
    """The flood behind the full-disk test, made deterministic: asyncio logs one "Task exception was
    never retrieved" per failed write, however many the garbage collector finds; one line stays."""
    import logging

    from veclip_jax.cli import OneLineFromLibraries

    keep = OneLineFromLibraries()

    def record(name: str, msg: str, exc: BaseException | None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, info)

    err = ValueError("RESOURCE_EXHAUSTED: No space left on device")
    msg = "Task exception was never retrieved\nfuture: <Task {}>"
    flood = [record("asyncio", msg.format(i), err) for i in range(30)]
    kept = [r for r in flood if keep.filter(r)]
    assert [r.getMessage() for r in kept] == ["Task exception was never retrieved (ValueError)"]
    assert kept[0].exc_info is None  # no traceback
    ours = [record("veclip_jax.train", "saving failed", None) for _ in range(2)]
    assert all(keep.filter(r) for r in ours)  # our own lines are never dropped
    other = record("absl", "Save Finalize thread failed.", err)
    assert keep.filter(other) and other.getMessage() == "Save Finalize thread failed. (ValueError)"


def test_eval_images_are_budgeted_from_their_header_and_16_bit_is_scaled(monkeypatch):
    import io

    import numpy as np
    from PIL import Image

    from veclip_jax.data import image_ops
    from veclip_jax.eval.datasets import load_image

    pixels = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    rgb = np.asarray(load_image(png.getvalue()))
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - pixels.mean() * 255 / 65535) < 0.5  # not clipped
    monkeypatch.setattr(image_ops, "MAX_DECODE_BYTES", 64 * 64 * 2 - 1)  # one byte short of this image
    with pytest.raises(image_ops.ImageDecodeError, match="decodes to 8192 bytes"):
        load_image(png.getvalue())
