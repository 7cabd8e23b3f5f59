"""Issue 22, the converter: image paths confined to the root (#5), one-line exit 2 for user errors
(#12), one converter per output and no temporary file left behind (#13)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from veclip_jax.cli import make_dataset
from veclip_jax.data import convert, records, sources
from veclip_jax.data.convert_run import OutputLock, lock_path
from veclip_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def _all_records(out: str, num_shards: int) -> list[records.Record]:
    return [
        r for j in range(num_shards) for r in records.RecordReader(records.shard_name(out, j, num_shards))
    ]


def _tree(tmp_path) -> tuple[str, bytes]:
    """An image root with good images, and a "secret" (a valid image, so only confinement stops it)."""
    root = tmp_path / "img"
    (root / "sub").mkdir(parents=True)
    for i in range(2):
        (root / f"{i}.jpg").write_bytes(_image(i))
    secret = _image(99)
    (tmp_path / "secret.jpg").write_bytes(secret)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "secret.jpg").write_bytes(secret)
    os.symlink(tmp_path / "secret.jpg", root / "link_out.jpg")  # a symlink in the root pointing out
    os.symlink(root / "0.jpg", root / "sub" / "link_in.jpg")  # one pointing inside: fine
    return str(root), secret


# Cells naming files outside the root (every one a valid image), and cells that stay inside.
def _cells(tmp_path, root: str) -> list[tuple[str, str]]:
    return [
        ("in0", "0.jpg"),
        ("in1", os.path.join(root, "1.jpg")),  # absolute, inside the root
        ("in2", "sub/../1.jpg"),
        ("in3", "sub/link_in.jpg"),
        ("abs", str(tmp_path / "secret.jpg")),
        ("dots", "../secret.jpg"),
        ("home", "~/secret.jpg"),
        ("link", "link_out.jpg"),
        ("deep", "sub/../../secret.jpg"),
    ]


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_table_image_paths_outside_the_root_are_refused_per_record(tmp_path, fake_home):
    root, secret = _tree(tmp_path)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "alt_text", "key"])
        w.writerows((cell, f"caption {key}", key) for key, cell in _cells(tmp_path, root))
    out = str(tmp_path / "out" / "t")
    summary = convert.convert_table(str(tmp_path / "pairs.csv"), out, 2, image_root=root)
    got = _all_records(out, 2)
    assert sorted(r.key for r in got) == ["in0", "in1", "in2", "in3"]
    assert all(r.jpeg != secret for r in got)
    # "~" is a name under the root, never the home directory: not found there.
    assert summary.skipped == {"image_not_found": 1, "image_outside_root": 4}


def test_parquet_image_paths_outside_the_root_are_refused_per_record(tmp_path, fake_home):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, secret = _tree(tmp_path)
    cells = _cells(tmp_path, root)
    pq.write_table(
        pa.table({
            "image": [cell for _, cell in cells],
            "caption": [f"caption {key}" for key, _ in cells],
            "key": [key for key, _ in cells],
        }),
        tmp_path / "a.parquet",
    )  # fmt: skip
    out = str(tmp_path / "out" / "p")
    summary = convert.convert_parquet(str(tmp_path / "a.parquet"), out, 1, image_root=root)
    got = _all_records(out, 1)
    assert sorted(r.key for r in got) == ["in0", "in1", "in2", "in3"]
    assert all(r.jpeg != secret for r in got)
    assert summary.skipped == {"image_outside_root": 5}  # the reader expands "~": outside too


def test_image_folder_symlinks_out_of_the_tree_are_not_followed(tmp_path):
    root, secret = _tree(tmp_path)
    os.symlink(tmp_path / "secret.jpg", os.path.join(root, "sub", "link_out.jpg"))
    out = str(tmp_path / "out" / "f")
    summary = convert.convert_image_folder(root, out, 1, class_template="a photo of {}.")
    got = _all_records(out, 1)
    assert [r.key for r in got] == ["sub/link_in.jpg"]  # images at the top have no class: no caption
    assert all(r.jpeg != secret for r in got)
    assert summary.skipped == {"empty_caption": 3, "image_outside_root": 1}


# --- exit codes: one line, exit 2 --------------------------------------------------------------


def _tar(path, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("jpg", _image(i)), ("txt", f"caption {i}".encode()),
                              ("json", json.dumps({"url": f"http://x/{i}.jpg"}).encode())):  # fmt: skip
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = make_dataset.main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_exit_2(code: int, err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if not line[:2].isdigit()]  # the log's lines start HH:MM:SS
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_make_dataset_user_errors_exit_2_with_one_line(tmp_path, capsys):
    _tar(tmp_path / "a.tar", 2)
    tars = str(tmp_path / "a.tar")
    out = str(tmp_path / "out" / "train")
    (tmp_path / "vecap.json").write_text('{"http://x/0.jpg": "a caption", "http://x/1.jp')  # truncated
    code, err = _cli(capsys, f"--webdataset={tars}", f"--vecap_json={tmp_path / 'vecap.json'}",
                     f"--out={out}", "--num_shards=1", "--workers=1")  # fmt: skip
    _one_line_exit_2(code, err, "vecap.json")
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]  # the index's .tmp is gone

    code, err = _cli(capsys, f"--webdataset={tars}", f"--out={out}", "--num_shards=3", "--workers=1")
    _one_line_exit_2(code, err, "at most 1 shards")

    code, err = _cli(capsys, f"--webdataset={tars}", f"--out={out}", "--num_shards=1", "--source=a")
    assert code == 0, err
    code, err = _cli(capsys, f"--webdataset={tars}", f"--out={out}", "--num_shards=1", "--source=b")
    _one_line_exit_2(code, err, "other inputs or options (differs in: source)")

    (tmp_path / "t.csv").write_text("file,alt_text\na.jpg,x\n")
    code, err = _cli(capsys, f"--table={tmp_path / 't.csv'}", f"--out={tmp_path / 't'}", "--num_shards=1")
    _one_line_exit_2(code, err, "no image column 'image'")

    code, err = _cli(
        capsys, f"--webdataset={tmp_path / 'none.tar'}", f"--out={tmp_path / 'n'}", "--num_shards=1"
    )
    _one_line_exit_2(code, err, "none of the 1 input tars exists")


def _empty_shard(path) -> None:
    with records.RecordWriter(str(path)):
        pass


@pytest.mark.parametrize("case", ["not_array_record", "no_records", "mixed_formats"])
def test_data_layer_user_errors_are_user_errors(tmp_path, case):
    # Each raised a plain ValueError: the trainer's CLI (which maps UserError to exit 2) printed a traceback.
    if case == "not_array_record":
        (tmp_path / "a.array_record").write_bytes(b"PK\x03\x04 a zip file, not ArrayRecord")
        files, match = str(tmp_path / "a.array_record"), "not a readable ArrayRecord file"
    elif case == "no_records":
        _empty_shard(tmp_path / "e.array_record")
        files, match = str(tmp_path / "e.array_record"), "the shards hold no records"
    else:
        _empty_shard(tmp_path / "e.array_record")
        _tar(tmp_path / "a.tar", 1)
        files, match = f"{tmp_path / 'e.array_record'},{tmp_path / 'a.tar'}", "one source holds one format"
    with pytest.raises(UserError, match=match) as e:
        sources._resolve("", 0, files, 1.0, 0.0, ("", "", ""), 0)
    assert isinstance(e.value, ValueError)  # callers that caught ValueError still do


def test_the_trainer_cli_exits_2_on_a_shard_that_is_not_array_record(tmp_path, demo_cache):
    from veclip_jax.data.demo import ensure_demo_data

    (tmp_path / "a.array_record").write_bytes(b"PK\x03\x04 a zip file, not ArrayRecord")
    shard, tokenizer = tmp_path / "a.array_record", ensure_demo_data(demo_cache).tokenizer
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
           f"--workdir={tmp_path / 'run'}", f"--config.data.train_files={shard}",
           f"--config.data.tokenizer={tokenizer}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "not a readable ArrayRecord file" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


# --- one converter per output; no temporary file left ------------------------------------------


def test_a_second_converter_on_the_same_output_is_refused_naming_the_holder(tmp_path, capsys):
    _tar(tmp_path / "a.tar", 2)
    out = str(tmp_path / "out" / "train")
    os.makedirs(os.path.dirname(out))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from veclip_jax.data.convert_run import OutputLock; "
        f"OutputLock({out!r}).acquire(); print('held', flush=True); time.sleep(600)"
    )], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = _cli(capsys, f"--webdataset={tmp_path / 'a.tar'}", f"--out={out}", "--num_shards=1")
        _one_line_exit_2(code, err, 'being converted by another converter ({"host": ')
        assert f'"pid": {holder.pid}' in err
        assert not os.path.exists(records.shard_name(out, 0, 1))  # nothing written
        # A task of a shared conversion is refused too (the whole output is held) ...
        code, err = _cli(capsys, f"--webdataset={tmp_path / 'a.tar'}", f"--out={out}", "--num_shards=1",
                         "--num_tasks=2", "--task_index=0")  # fmt: skip
        _one_line_exit_2(code, err, f'"pid": {holder.pid}')
    finally:
        holder.kill()
        holder.wait()
    # ... and the lock of a dead converter is free.
    code, err = _cli(capsys, f"--webdataset={tmp_path / 'a.tar'}", f"--out={out}", "--num_shards=1")
    assert code == 0, err


def test_tasks_of_a_shared_conversion_run_together_but_not_twice(tmp_path):
    out = str(tmp_path / "train")
    with OutputLock(out, (0, 2)), OutputLock(out, (1, 2)):  # two machines' tasks: together
        with pytest.raises(convert.ConversionBusyError, match=r'"task": \[1, 2\]'):
            OutputLock(out, (1, 2)).acquire()  # the same task twice
        with pytest.raises(convert.ConversionBusyError, match=r'"task": \[0, 2\]'):
            OutputLock(out, (0, 1)).acquire()  # the whole conversion while tasks run
    OutputLock(out).acquire().release()


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = str(tmp_path / "train")
    os.symlink(victim, lock_path(out))
    with pytest.raises(convert.ConversionError, match="is not a plain lock file \\(a symlink\\)"):
        OutputLock(out).acquire()
    assert victim.read_text() == "precious"


class _FullDisk:
    """ArrayRecordWriter that fails as on a full disk, after writing a little (to PATH.tmp)."""

    def __init__(self, path: str, options: str):
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._n = 0

    def write(self, data: bytes) -> None:
        self._n += 1
        self._f.write(data)
        if self._n == 2:
            raise RuntimeError("write() failed: No space left on device; writing shard")

    def close(self) -> None:
        self._f.close()
        raise RuntimeError("Failed to close chunk_writer: No space left on device")


def test_a_full_disk_during_conversion_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    _tar(tmp_path / "a.tar", 3)
    out = str(tmp_path / "out" / "train")
    os.makedirs(os.path.dirname(out))
    monkeypatch.setattr(records, "ArrayRecordWriter", _FullDisk)
    code, err = _cli(capsys, f"--webdataset={tmp_path / 'a.tar'}", f"--out={out}", "--num_shards=1",
                     "--workers=1")  # fmt: skip
    assert code == 1, err
    assert "error: OSError: [Errno 28] No space left on device" in err and "Traceback" not in err
    left = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs]
    assert not [p for p in left if ".tmp" in p], left
    assert not os.path.exists(records.shard_name(out, 0, 1))


def test_temporary_files_of_a_dead_converter_are_removed_and_no_one_elses(tmp_path):
    _tar(tmp_path / "a.tar", 2)
    out = str(tmp_path / "out" / "train")
    os.makedirs(out + ".shard-stats")
    ours = [
        records.shard_name(out, 0, 1) + ".tmp",
        out + ".stats.json.tmp4242",
        os.path.join(out + ".shard-stats", "00000-of-00001.json.tmp17"),
    ]
    others = [
        records.shard_name(out, 0, 2) + ".tmp",  # another conversion's (other --num_shards)
        str(tmp_path / "out" / "notes.tmp"),
        out + ".stats.json.tmpx",
    ]
    for p in ours + others:
        with open(p, "w") as f:
            f.write("left over")
    convert.convert_webdataset(str(tmp_path / "a.tar"), out, 1)
    assert [os.path.exists(p) for p in ours] == [False] * 3
    assert [os.path.exists(p) for p in others] == [True] * 3


def test_a_shard_writer_that_fails_on_a_full_disk_removes_its_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "ArrayRecordWriter", _FullDisk)
    path = str(tmp_path / "s.array_record")
    with pytest.raises(OSError, match="No space left"), records.RecordWriter(path) as w:
        w.write(records.Record(key="a", jpeg=b"x"))
        w.write(records.Record(key="b", jpeg=b"x"))  # fails; abort()'s close() fails again
    w = records.RecordWriter(path)
    w.write(records.Record(key="a", jpeg=b"x"))
    with pytest.raises(OSError, match="No space left"):
        w.close()  # the data fit, the final flush did not
    assert os.listdir(tmp_path) == []
