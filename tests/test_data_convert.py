"""The dataset converter: img2dataset tars and tables -> ArrayRecord shards, VeCap join, skips, resume."""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from veclip_jax.data import (
    convert,
    image_ops,
    lane_streams,
    pipeline,
    preprocess,
    records,
    skips,
    sources,
    tokenizer,
)
from veclip_jax.data.paths import expand_paths
from veclip_jax.data.readers import vecap_json
from veclip_jax.data.readers.table import TableColumns
from veclip_jax.defaults import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    """A small noisy image: every sample's bytes differ, so a swapped image is caught."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def _write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _meta(url: str | None = None, status: str | None = "success", **more) -> bytes:
    m = dict(more)
    if url is not None:
        m["url"] = url
    if status is not None:
        m["status"] = status
    return json.dumps(m).encode()


# The VeCap release: JSON objects {url: caption}. A URL in both files takes the first file's caption.
VECAP_A = {
    "http://x.org/0.jpg": 'A red kite and a blue kite over a beach, "flying" high.',
    "http://x.org/2.jpg": "Un café au lait sur une table en bois.\nDeux croissants à côté.",
    "http://x.org/5.jpg": "A green webp square on a white background.",
}
VECAP_B = {
    "http://x.org/3.jpg": "A photo with no AltText: a grey cat on a sofa.",
    "http://x.org/0.jpg": "a later, different caption that must lose",
    "http://unused.org/9.jpg": "never downloaded",
    "http://x.org/bad.jpg": 123,  # not a caption: ignored
}


class Sample:
    """One input sample and what the converter must make of it (a record, or a skip reason)."""

    def __init__(self, key, members, *, alt=None, vecap=None, image=None, skip=None):
        self.key, self.members, self.alt, self.vecap, self.image, self.skip = (
            key,
            members,
            alt,
            vecap,
            image,
            skip,
        )


def _samples() -> list[list[Sample]]:
    """Three tars of img2dataset-like samples: the good, and each kind of bad."""
    j0, j2, j3, j4, j6, j7, j8 = (_image(i) for i in (0, 2, 3, 4, 6, 7, 8))
    p1, w5 = _image(1, "PNG"), _image(5, "WEBP")
    truncated = j7[: len(j7) // 2]  # a valid header, half the data
    tar0 = [
        Sample(
            "00000000",
            {"jpg": j0, "txt": b"a red &amp; blue kite", "json": _meta("http://x.org/0.jpg", caption="c")},
            alt="a red &amp; blue kite",  # stored as written: the loader cleans
            vecap=VECAP_A["http://x.org/0.jpg"],
            image=j0,
        ),
        Sample(
            "00000001",
            {"png": p1, "txt": b"png pair", "json": _meta("http://x.org/1.jpg")},
            alt="png pair",
            image=p1,
        ),
        Sample(
            "00000002", {"json": _meta("http://x.org/f.jpg", status="failed_to_download")}, skip="not_success"
        ),
        Sample(
            "00000003",
            {"jpg": b"\xff\xd8\xff not a jpeg", "txt": b"broken", "json": _meta("http://x.org/0.jpg")},
            skip="undecodable_image",
        ),
    ]
    tar1 = [
        Sample(
            "00010000",
            {"jpg": j2, "json": _meta("http://x.org/2.jpg", caption="caption from the json")},
            alt="caption from the json",
            vecap=VECAP_A["http://x.org/2.jpg"],
            image=j2,
        ),
        Sample(
            "00010001",
            {"jpeg": j3, "json": _meta("http://x.org/3.jpg")},
            vecap=VECAP_B["http://x.org/3.jpg"],
            image=j3,
        ),
        Sample(
            "00010002",
            {"jpg": j4, "txt": b" \t&nbsp; ", "json": _meta("http://x.org/4.jpg")},
            skip="empty_caption",
        ),
        Sample(
            "00010003",
            {"webp": w5, "txt": "webp pair é".encode(), "json": _meta("http://x.org/5.jpg")},
            alt="webp pair é",
            vecap=VECAP_A["http://x.org/5.jpg"],
            image=w5,
        ),
        Sample(
            "00010004", {"txt": b"no image here", "json": _meta("http://x.org/6.jpg")}, skip="missing_image"
        ),
    ]
    tar2 = [
        Sample(
            "00020000",
            {"jpg": j6, "txt": b"no status", "json": _meta("http://x.org/7.jpg", status=None)},
            alt="no status",
            image=j6,
        ),
        Sample("00020001", {"jpg": j6, "txt": b"bad json", "json": b"{not json"}, skip="bad_record"),
        Sample(
            "00020002",
            {"jpg": truncated, "txt": b"truncated", "json": _meta("http://x.org/8.jpg")},
            skip="undecodable_image",
        ),
        Sample("00020003", {"jpg": j8, "txt": b"no json at all"}, alt="no json at all", image=j8),
        Sample("00020000", {"jpg": j8, "txt": b"same key again", "json": _meta()}, skip="duplicate_key"),
    ]
    return [tar0, tar1, tar2]


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    """Tars 00000..00002 and VeCap JSON files on disk; the spec names a missing 00003 too."""
    root = tmp_path_factory.mktemp("wds")
    tars = _samples()
    for i, samples in enumerate(tars):
        _write_tar(root / f"{i:05d}.tar", [(s.key, s.members) for s in samples])
    (root / "vecap-a.json").write_text(json.dumps(VECAP_A, ensure_ascii=False, indent=1), encoding="utf-8")
    (root / "vecap-b.json").write_text(json.dumps(VECAP_B), encoding="utf-8")
    return {
        "root": root,
        "tars": tars,
        "spec": str(root / "{00000..00003}.tar"),
        "vecap": f"{root}/vecap-a.json,{root}/vecap-b.json",  # in this order: a's captions win
    }


def _expected(tars: list[list[Sample]], num_shards: int):
    good = {s.key: (i % num_shards, s) for i, t in enumerate(tars) for s in t if s.skip is None}
    skipped: dict[str, int] = {}
    for t in tars:
        for s in t:
            if s.skip:
                skipped[s.skip] = skipped.get(s.skip, 0) + 1
    return good, skipped


def _read_shards(out: str, num_shards: int) -> list[list[records.Record]]:
    return [list(records.RecordReader(records.shard_name(out, j, num_shards))) for j in range(num_shards)]


def _convert_wds(wds, out, num_shards=2, workers=1, **kwargs) -> convert.ConversionSummary:
    return convert.convert_webdataset(
        wds["spec"], str(out), num_shards, vecap_json=wds["vecap"], source="test", workers=workers, **kwargs
    )


@pytest.fixture(scope="module")
def converted(wds, tmp_path_factory):
    """The same conversion with 1 worker (in process) and with 2 worker processes."""
    results = {}
    for workers in (1, 2):
        out = str(tmp_path_factory.mktemp(f"out{workers}") / "train")
        results[workers] = (out, _convert_wds(wds, out, num_shards=2, workers=workers))
    return results


# --- webdataset ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_every_good_sample_is_written_once_with_its_captions_and_image(wds, converted, workers):
    out, summary = converted[workers]
    good, _ = _expected(wds["tars"], 2)
    shards = _read_shards(out, 2)
    keys = [r.key for shard in shards for r in shard]
    assert sorted(keys) == sorted(good), "each good sample exactly once, nothing else"
    for j, shard in enumerate(shards):
        for r in shard:
            want_shard, s = good[r.key]
            assert j == want_shard, f"{r.key}: input tar i goes to shard i % 2"
            assert (r.alt_text, r.vecap_text, r.jpeg, r.source) == (s.alt, s.vecap, s.image, "test"), r.key
    assert summary.records == len(good)
    assert [s["records"] for s in summary.shards] == [len(shard) for shard in shards]
    assert summary.with_alt_text == sum(s.alt is not None for _, s in good.values())


def test_vecap_captions_are_joined_by_url_first_file_winning(wds, converted):
    out, summary = converted[1]
    by_key = {r.key: r for shard in _read_shards(out, 2) for r in shard}
    assert by_key["00000000"].vecap_text == VECAP_A["http://x.org/0.jpg"]  # not VECAP_B's later caption
    assert by_key["00010001"].vecap_text == VECAP_B["http://x.org/3.jpg"]  # from the second file
    assert by_key["00010001"].alt_text is None  # kept: a VeCap caption alone is a caption
    assert by_key["00000001"].vecap_text is None  # its URL is in no file
    assert summary.vecap_joined == 4
    assert summary.vecap_join_rate == pytest.approx(4 / 7)


def test_bad_samples_are_skipped_and_counted_by_reason(wds, converted):
    _, expected_skips = _expected(wds["tars"], 2)
    expected_skips["missing_file"] = 1  # 00003.tar of the brace range does not exist
    for workers in (1, 2):
        out, summary = converted[workers]
        assert summary.skipped == expected_skips
        assert summary.missing_inputs == [str(wds["root"] / "00003.tar")]
        assert summary.shards[1]["skipped"]["missing_file"] == 1  # tar 3 belongs to shard 3 % 2
        with open(convert.stats_path(out)) as f:
            assert json.load(f) == summary.to_dict()
        assert "records" in summary.format() and "empty_caption" in summary.format()


def test_worker_count_does_not_change_the_shards(converted):
    (out1, _), (out2, _) = converted[1], converted[2]
    for j in range(2):
        with open(records.shard_name(out1, j, 2), "rb") as a, open(records.shard_name(out2, j, 2), "rb") as b:
            assert a.read() == b.read()


def test_no_temporary_files_are_left_and_side_outputs_do_not_match_the_shards_glob(converted):
    out, _ = converted[2]
    left = sorted(os.listdir(os.path.dirname(out)))
    assert left == [
        "train-00000-of-00002.array_record",
        "train-00001-of-00002.array_record",
        "train.lock",  # kept, empty: removing it could let two converters lock two files
        "train.shard-stats",
        "train.stats.json",
    ]
    # `--config.data.train_files='DIR/train-*'` reads the shards and nothing else (it used to hit the stats).
    assert records.shard_paths(f"{out}-*") == [records.shard_name(out, j, 2) for j in range(2)]


def test_rerun_rewrites_only_a_deleted_shard_identically(wds, tmp_path):
    out = str(tmp_path / "train")
    first = _convert_wds(wds, out, num_shards=3)
    paths = [records.shard_name(out, j, 3) for j in range(3)]
    contents = [open(p, "rb").read() for p in paths]
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    os.remove(paths[1])
    with open(paths[1] + ".tmp", "wb") as f:  # what a killed run leaves behind
        f.write(b"half a shard")

    again = _convert_wds(wds, out, num_shards=3)

    assert (again.written, again.reused) == (1, 2)
    assert [s["reused"] for s in again.shards] == [True, False, True]
    assert [os.stat(p).st_mtime_ns for p in (paths[0], paths[2])] == [mtimes[0], mtimes[2]]
    assert [open(p, "rb").read() for p in paths] == contents
    assert not os.path.exists(paths[1] + ".tmp")
    # The totals still cover the shards made by the first run.
    for field in ("records", "skipped", "vecap_joined", "missing_inputs"):
        assert getattr(again, field) == getattr(first, field), field


def test_rerun_with_other_inputs_is_refused_before_writing(wds, tmp_path):
    out = str(tmp_path / "train")
    _convert_wds(wds, out, num_shards=2)
    before = os.stat(records.shard_name(out, 0, 2)).st_mtime_ns
    os.remove(records.shard_name(out, 1, 2))
    with pytest.raises(ValueError, match="other inputs or options.*vecap_json"):
        convert.convert_webdataset(
            wds["spec"], out, 2, vecap_json=str(wds["root"] / "vecap-a.json"), source="test"
        )
    assert os.stat(records.shard_name(out, 0, 2)).st_mtime_ns == before
    assert not os.path.exists(records.shard_name(out, 1, 2))


def test_damaged_tars_keep_the_samples_before_the_damage(tmp_path):
    images = [_image(10 + i) for i in range(3)]
    _write_tar(tmp_path / "t.tar", [(f"k{i}", {"jpg": images[i], "txt": b"caption"}) for i in range(3)])
    with tarfile.open(tmp_path / "t.tar") as tar:
        cut = tar.getmember("k2.jpg").offset_data + 100  # inside the last sample's image
    with open(tmp_path / "t.tar", "r+b") as f:
        f.truncate(cut)
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 50)

    summary = convert.convert_webdataset(f"{tmp_path}/t.tar,{tmp_path}/garbage.tar", str(tmp_path / "o"), 1)

    assert [r.key for r in _read_shards(str(tmp_path / "o"), 1)[0]] == ["k0", "k1"]
    assert summary.skipped == {"unreadable_file": 2}
    assert summary.unreadable_inputs == [str(tmp_path / "t.tar"), str(tmp_path / "garbage.tar")]


def test_image_check_can_be_turned_off(tmp_path):
    _write_tar(tmp_path / "t.tar", [("k0", {"jpg": b"not a jpeg", "txt": b"caption"})])
    summary = convert.convert_webdataset(str(tmp_path / "t.tar"), str(tmp_path / "o"), 1, verify_images=False)
    assert summary.records == 1 and summary.skipped == {}
    assert _read_shards(str(tmp_path / "o"), 1)[0][0].jpeg == b"not a jpeg"  # the pipeline will skip it


def test_more_shards_than_input_tars_is_refused(wds, tmp_path):
    with pytest.raises(ValueError, match="at most 4 shards"):
        _convert_wds(wds, tmp_path / "train", num_shards=5)
    with pytest.raises(FileNotFoundError, match="none of the 2 input tars"):
        convert.convert_webdataset(f"{tmp_path}/a.tar,{tmp_path}/b.tar", str(tmp_path / "o"), 1)


# --- pieces -------------------------------------------------------------------------------------


def test_vecap_json_is_streamed_across_chunk_boundaries(tmp_path):
    data = {
        "http://a/1.jpg": 'quotes " and \\ backslashes, \u00e9\u4e2d\U0001f600, \n newline',
        "http://a/2.jpg": "",
        "http://a/3.jpg": 12345,
        "http://a/4.jpg": {"nested": [1, 2.5, None, True]},
        "http://a/5.jpg": "x" * 50,
    }
    (tmp_path / "v.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    with gzip.open(tmp_path / "v.json.gz", "wt", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
    for name in ("v.json", "v.json.gz"):
        for chunk in (1, 3, 7, 1 << 20):
            assert list(vecap_json.iter_vecap_json(tmp_path / name, chunk_chars=chunk)) == list(data.items())
    (tmp_path / "empty.json").write_text(" {} ")
    assert list(vecap_json.iter_vecap_json(tmp_path / "empty.json")) == []


@pytest.mark.parametrize(
    "text", ['["http://a", "b"]', '{"http://a": "b"', '{"http://a" "b"}', '{"a": "b"} {}', '{1: "b"}', ""]
)
def test_vecap_json_that_is_not_one_object_is_an_error_naming_the_file(tmp_path, text):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match="bad.json"):
        list(vecap_json.iter_vecap_json(tmp_path / "bad.json", chunk_chars=4))


def test_path_specs_expand_ranges_lists_globs_and_comma_lists(tmp_path, monkeypatch):
    for name in ("a1.tar", "a2.tar", "b.tar"):
        (tmp_path / name).touch()
    d = str(tmp_path)
    # Ranges: zero-padded like their bounds, plain otherwise, either direction; names need not exist.
    assert expand_paths(f"{d}/x{{008..011}}.tar") == [f"{d}/x{n}.tar" for n in ("008", "009", "010", "011")]
    assert expand_paths(f"{d}/x{{9..11}}.tar") == [f"{d}/x{n}.tar" for n in (9, 10, 11)]
    assert expand_paths("{2..0}") == ["2", "1", "0"]
    assert expand_paths("s{0..1}-{a,b}") == ["s0-a", "s0-b", "s1-a", "s1-b"]
    assert expand_paths("{x}.tar") == ["{x}.tar"]  # not a pattern: kept literally
    assert expand_paths(f"{d}/*.tar") == [f"{d}/a1.tar", f"{d}/a2.tar", f"{d}/b.tar"]  # globs: sorted
    # A comma list whose items hold brace lists (commas inside braces do not split), and a glob,
    # sorted; a1.tar, named twice, is kept once, where it first appears.
    assert expand_paths(f"{d}/{{b,a1}}.tar, {d}/a*.tar,,") == [f"{d}/b.tar", f"{d}/a1.tar", f"{d}/a2.tar"]
    # A list: items are specs of their own, not split at commas.
    assert expand_paths([f"{d}/x{{1..2}}.tar", "c,d"]) == [f"{d}/x1.tar", f"{d}/x2.tar", "c,d"]
    monkeypatch.setenv("HOME", d)
    assert expand_paths("~/b*") == [f"{d}/b.tar"]
    assert expand_paths(" ") == []
    with pytest.raises(FileNotFoundError, match=r"no files match '.*/none\*\.tar'"):
        expand_paths(f"{d}/b.tar,{d}/none*.tar")


def test_readers_do_not_import_the_converter():
    # Training may stream tars or look up captions without the conversion driver (and its process pool).
    code = (
        "import sys, veclip_jax.data.readers.webdataset, veclip_jax.data.readers.vecap_json, "
        "veclip_jax.data.readers.table, veclip_jax.data.paths; "
        "assert 'veclip_jax.data.convert' not in sys.modules, 'a reader imports the converter'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_image_check_accepts_what_the_pipeline_decodes():
    jpeg = _image(0)
    assert image_ops.image_decodes(jpeg)
    assert image_ops.image_decodes(_image(0, "PNG")) and image_ops.image_decodes(_image(0, "WEBP"))
    assert not image_ops.image_decodes(jpeg[: len(jpeg) // 2])
    assert not image_ops.image_decodes(b"")
    assert not image_ops.image_decodes(b"GIF89a nonsense")


# --- tables -------------------------------------------------------------------------------------


def test_table_rows_become_records(wds, tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_image(20 + i))
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")
    absolute = str(tmp_path / "img" / "4.jpg")
    rows = [
        # image, alt_text, vecap_text, key, url
        ("0.jpg", "alt zero", "vecap zero", "k0", ""),
        ("1.jpg", "alt one, with a comma", "", "", "http://x.org/2.jpg"),  # VeCap joined by URL; key = row
        ("missing.jpg", "alt", "vecap", "k2", ""),
        ("3.jpg", "", "", "k3", "http://nowhere"),
        (absolute, "", "only vecap", "k4", ""),
        ("bad.jpg", "alt", "", "k5", ""),
        ("", "alt", "", "k6", ""),
    ]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "alt_text", "vecap_text", "key", "url"])
        w.writerows(rows)

    out = str(tmp_path / "out" / "train")
    summary = convert.convert_table(
        str(tmp_path / "pairs.csv"),
        out,
        2,
        image_root=str(tmp_path / "img"),
        vecap_json=wds["vecap"],
        workers=2,
    )

    shards = _read_shards(out, 2)
    got = {r.key: (j, r.alt_text, r.vecap_text, r.jpeg) for j, shard in enumerate(shards) for r in shard}
    assert got == {
        "k0": (0, "alt zero", "vecap zero", _image(20)),
        "1": (1, "alt one, with a comma", VECAP_A["http://x.org/2.jpg"], _image(21)),
        "k4": (0, None, "only vecap", _image(24)),
    }
    assert summary.skipped == {
        "missing_image": 1,
        "empty_caption": 1,
        "image_not_found": 1,
        "undecodable_image": 1,
    }
    assert summary.vecap_joined == 1


def test_table_columns_and_tab_separator_are_configurable(tmp_path):
    (tmp_path / "a.png").write_bytes(_image(30, "PNG"))
    (tmp_path / "pairs.tsv").write_text("id\tfile\ttext\nx1\ta.png\ta caption, with a comma\n")
    columns = TableColumns(image="file", alt_text="text", key="id")
    convert.convert_table(str(tmp_path / "pairs.tsv"), str(tmp_path / "t"), 1, columns=columns)
    [[record]] = _read_shards(str(tmp_path / "t"), 1)
    assert (record.key, record.alt_text, record.vecap_text, record.jpeg) == (
        "x1",
        "a caption, with a comma",
        None,
        _image(30, "PNG"),
    )
    with pytest.raises(ValueError, match="no image column 'image'"):
        convert.convert_table(str(tmp_path / "pairs.tsv"), str(tmp_path / "u"), 1)


# --- the consumers: the training pipeline and the command line -----------------------------------


def test_converted_shards_feed_the_training_pipeline(converted, tmp_path):
    out, _ = converted[1]
    files = f"{out}-*{records.SHARD_SUFFIX}"
    spm = tokenizer.train_tokenizer_from_shards(files, tmp_path / "spiece.model", vocab_size=200)
    config = get_config()
    config.batch_size = 4
    config.data.train_files = files
    config.data.tokenizer = spm
    config.data.num_workers = 0
    it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    try:
        batch = next(it)
        assert it.bad_counts() == {k: 0 for k in it.bad_counts()}
    finally:
        it.close()
    size, length = config.model.vision.image_size, config.model.text.context_length
    assert batch["image"].shape == (4, size, size, 3) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (4, length) and batch["tokens"].dtype == np.int32
    assert ((batch["tokens"] == config.model.text.eos_id).sum(axis=1) == 1).all()


def _mixed_tar(path) -> list[tuple[str, dict[str, bytes]]]:
    """Good samples among one of each kind of bad one, a non-UTF-8 caption among them."""
    good = [_image(70 + i) for i in range(4)]
    samples = [
        ("s0", {"jpg": good[0], "txt": b"a red kite", "json": _meta("http://x.org/s0.jpg")}),
        ("s1", {"jpg": good[1], "txt": "un caf\xe9 cr\xe8me".encode("latin-1")}),  # not UTF-8: bad_caption
        ("s2", {"jpg": good[2], "txt": "un café crème".encode()}),
        ("s3", {"jpg": good[3], "json": _meta(caption="only in the json")}),  # no .txt: the .json caption
        ("s4", {"jpg": good[0], "txt": b" \t&nbsp;", "json": _meta(caption="unread")}),  # empty_caption
        ("s5", {"txt": b"no image", "json": _meta()}),  # missing_image
        ("s6", {"jpg": good[1], "txt": b"failed", "json": _meta(status="failed_to_download")}),  # not_success
        ("s7", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"broken"}),  # undecodable_image
        ("s8", {"jpg": good[2], "txt": b"bad json", "json": b"{not json"}),  # bad_record
        ("s9", {"jpg": good[3], "json": _meta(caption=7)}),  # bad_caption: a number is not a caption
        ("s10", {"jpg": good[1], "txt": b"the last good one"}),
    ]
    _write_tar(path, samples)
    return samples


def test_the_same_tar_gives_the_same_samples_converted_and_streamed(converted, tmp_path):
    """One parsing of tar samples (readers/webdataset.py) for the converter and the trainer's streamed reader.

    The converter used to decode a non-UTF-8 caption with replacement characters and keep the sample
    that streaming skips as bad_caption: the same tar gave two datasets. Both sides are read here as
    the trainer reads them (Preprocess), the converted shard as records, the tar as a streamed file.
    """
    samples = _mixed_tar(tmp_path / "mixed.tar")
    out = str(tmp_path / "c" / "train")
    summary = convert.convert_webdataset(str(tmp_path / "mixed.tar"), out, 1)
    [shard] = _read_shards(out, 1)
    assert {r.key: r.alt_text for r in shard} == {
        "s0": "a red kite",
        "s2": "un café crème",
        "s3": "only in the json",
        "s10": "the last good one",
    }

    spm = tokenizer.train_tokenizer_from_shards(
        f"{converted[1][0]}-*{records.SHARD_SUFFIX}", tmp_path / "spiece.model", vocab_size=200
    )
    config = get_config()
    config.data.vecap_prob = 0.0
    text = config.model.text
    tok = tokenizer.load_tokenizer(spm, text.context_length, pad_id=text.pad_id, eos_id=text.eos_id)

    def read(files: str) -> list:
        """Every example (or Skipped) of `files`' first epoch, in file order, as the trainer makes them."""
        config.data.train_files = files
        [spec] = sources.resolve_source_specs(config)
        if spec.streamed:  # the streamed reader of one file
            items = lane_streams.FileIterDataset(spec, sources.Item(0, 0, 0))
        else:
            records_of_epoch_0 = [sources.Item(0, 0, i) for i in range(len(shard))]
            items = grain.MapDataset.source(records_of_epoch_0).to_iter_dataset()
        return list(items.map(preprocess.Preprocess([spec], preprocess.image_spec(config), tok, True)))

    as_records = read(records.shard_name(out, 0, 1))
    streamed = read(str(tmp_path / "mixed.tar"))
    assert all(isinstance(e, preprocess.Example) for e in as_records)
    tokens = {shard[int(e.arrays["index"])].key: e.arrays["tokens"] for e in as_records}
    streamed_tokens = {
        samples[int(e.arrays["index"]) & (2**sources.SAMPLE_BITS - 1)][0]: e.arrays["tokens"]
        for e in streamed
        if isinstance(e, preprocess.Example)
    }
    assert list(streamed_tokens) == list(tokens)  # the same samples, in tar order
    for key, t in tokens.items():
        np.testing.assert_array_equal(streamed_tokens[key], t, err_msg=key)
    streamed_skips = collections.Counter(e.reason for e in streamed if isinstance(e, sources.Skipped))
    assert summary.skipped == dict(streamed_skips)  # the same skips, by the same names
    assert summary.skipped == {"bad_caption": 2, "empty_caption": 1, "missing_image": 1, "not_success": 1,
                               "undecodable_image": 1, "bad_record": 1}  # fmt: skip


def test_the_converter_and_the_trainer_name_skips_from_one_table():
    assert set(skips.BAD_REASONS) <= set(skips.REASONS)
    assert len(set(skips.BAD_REASONS)) == len(skips.BAD_REASONS)  # the columns of the trainer's counts
    assert convert.SKIP_REASONS == {r: skips.REASONS[r] for r in skips.CONVERTER_REASONS}
    assert set(skips.BAD_REASONS) - {"empty_file"} <= set(convert.SKIP_REASONS)  # a converter meets them too


def test_command_line_converts_then_resumes(wds, tmp_path):
    out = str(tmp_path / "cli" / "train")
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "make_dataset.py"),  # run from elsewhere
        f"--webdataset={wds['spec']}",
        f"--vecap_json={wds['vecap']}",
        f"--out={out}",
        "--num_shards=2",
        "--workers=1",
    ]
    # The package as `pip install -e .` provides it, whether or not this environment has that done.
    env = {**os.environ, "PYTHONPATH": REPO}
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "7 records in 2 shards" in first.stdout and "(2 written now, 0 done before)" in first.stdout
    assert "VeCap joined by URL: 4 of 7" in first.stdout
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "(0 written now, 2 done before)" in second.stdout
    with open(convert.stats_path(out)) as f:
        assert json.load(f)["records"] == 7


def test_table_rows_that_are_not_utf8_or_not_csv_are_skipped_counted_and_named(tmp_path, caplog):
    # Issue 10, case 9: one non-UTF-8 byte aborted the whole conversion with a traceback.
    (tmp_path / "a.jpg").write_bytes(_image(40))
    lines = [
        b"image,alt_text,key,notes",
        b"a.jpg,good one,g1,",
        b"a.jpg,caf\xe9 latin-1,bad1,",  # not UTF-8: skipped
        b"a.jpg," + b"x" * 200_000 + b",bad2,",  # over csv.field_size_limit(): the csv module refuses it
        b"a.jpg,good two,g2,\xff only in a column nobody reads",
    ]
    (tmp_path / "pairs.csv").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level("WARNING"):
        summary = convert.convert_table(str(tmp_path / "pairs.csv"), str(tmp_path / "out" / "t"), 1)
    [shard] = _read_shards(str(tmp_path / "out" / "t"), 1)
    assert sorted(r.key for r in shard) == ["g1", "g2"]
    assert summary.skipped == {"bad_row": 2}
    assert f"{tmp_path / 'pairs.csv'} line 3: not UTF-8" in caplog.text
    assert f"{tmp_path / 'pairs.csv'} line 4" in caplog.text


# --- Parquet, ImageFolder, several machines, keys repeated across shards (issue 12) --------------


def test_parquet_tables_become_records_with_bad_rows_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "on_disk.png").write_bytes(_image(52, "PNG"))
    pq.write_table(
        pa.table({
            "jpg": [_image(50), _image(51), None, b"not an image", None],
            "caption": ["first", None, "no image", "bad bytes", "path in another column"],
            "key": ["p0", "p1", "p2", "p3", "p4"],
        }),
        tmp_path / "a.parquet",
    )  # fmt: skip
    pq.write_table(pa.table({"image": [{"bytes": _image(53), "path": None}], "caption": ["hf struct"]}),
                   tmp_path / "b.parquet")  # fmt: skip
    (tmp_path / "c.parquet").write_bytes(b"PAR1 truncated")
    summary = convert.convert_parquet(str(tmp_path / "*.parquet"), str(tmp_path / "out" / "t"), 2)
    got = {
        r.key: (r.alt_text, r.jpeg) for shard in _read_shards(str(tmp_path / "out" / "t"), 2) for r in shard
    }
    assert got == {"p0": ("first", _image(50)), "b/0": ("hf struct", _image(53))}
    assert summary.skipped == {
        "unreadable_file": 1,
        "missing_image": 2,
        "empty_caption": 1,
        "undecodable_image": 1,
    }
    assert summary.unreadable_inputs == [str(tmp_path / "c.parquet")]


def test_image_folder_with_a_captions_file_becomes_records(tmp_path):
    for rel, seed in (("cat/a.jpg", 60), ("cat/b.png", 61), ("dog/c.jpg", 62), ("dog/notes.txt", 0)):
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_bytes(
            _image(seed, "PNG" if rel.endswith("png") else "JPEG") if seed else b""
        )
    (tmp_path / "captions.json").write_text(
        json.dumps({"cat/a.jpg": "a sleeping cat", "dog/c": {"vecap_text": "a dog"}})
    )
    summary = convert.convert_image_folder(str(tmp_path / "tree"), str(tmp_path / "out" / "f"), 1,
                                           captions=str(tmp_path / "captions.json"))  # fmt: skip
    [shard] = _read_shards(str(tmp_path / "out" / "f"), 1)
    assert {r.key: (r.alt_text, r.vecap_text) for r in shard} == {"cat/a.jpg": ("a sleeping cat", None),
                                                                  "dog/c.jpg": (None, "a dog")}  # fmt: skip
    assert summary.skipped == {"empty_caption": 1}  # cat/b.png: no entry, no --class_template
    convert.convert_image_folder(str(tmp_path / "tree"), str(tmp_path / "out" / "g"), 1,
                                 class_template="a photo of a {}.")  # fmt: skip
    [shard] = _read_shards(str(tmp_path / "out" / "g"), 1)
    assert sorted(r.alt_text for r in shard) == [
        "a photo of a cat.",
        "a photo of a cat.",
        "a photo of a dog.",
    ]


def test_machines_split_a_conversion_and_repeated_keys_across_shards_are_reported(wds, tmp_path):
    # Two machines (tasks) write one conversion: task i writes the shards j with j % 2 == i.
    out = str(tmp_path / "m" / "train")
    alone = _convert_wds(wds, str(tmp_path / "one" / "train"), num_shards=3)
    first = _convert_wds(wds, out, num_shards=3, task=(0, 2))
    assert [s["shard"] for s in first.shards] == ["train-00000-of-00003.array_record",
                                                  "train-00002-of-00003.array_record"]  # fmt: skip
    assert not os.path.exists(convert.stats_path(out))  # shard 1 is not done yet
    second = _convert_wds(wds, out, num_shards=3, task=(1, 2))
    assert second.stats_path == convert.stats_path(out, (1, 2))
    with open(convert.stats_path(out)) as f:
        whole = json.load(f)  # the last task to finish writes the whole conversion's summary
    assert whole["records"] == alone.records and whole["skipped"] == alone.skipped
    for j in range(3):
        with (
            open(records.shard_name(out, j, 3), "rb") as a,
            open(records.shard_name(alone.out, j, 3), "rb") as b,
        ):
            assert a.read() == b.read()
    assert whole["duplicate_keys_across_shards"] == 0
    # A copy of a tar among the inputs lands in another shard: its keys are reported as repeated.
    first_tar = expand_paths(wds["spec"])[0]
    copy = str(tmp_path / "copy.tar")
    with open(first_tar, "rb") as f, open(copy, "wb") as g:
        g.write(f.read())
    dup = convert.convert_webdataset([first_tar, copy], str(tmp_path / "d" / "train"), 2)
    assert dup.duplicate_keys_across_shards > 0
    assert dup.duplicate_key_shards[0] == [
        "train-00000-of-00002.array_record",
        "train-00001-of-00002.array_record",
    ]
    assert "keys in more than one shard" in dup.format()
