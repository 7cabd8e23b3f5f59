"""The VeCap caption pipeline (launch/make_vecap.py): rules, models, Ray Data run, resume, lock, join.

Tiny random-weight models (tests/vecap_models.py) caption the demo images under a local Ray with
2 CPUs. Every Ray test runs under a hard timeout (`helpers.deadline`): a hang fails instead of blocking.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow.parquet as pq
import pytest

from tests.helpers import deadline
from veclip_jax.data import convert, demo, records
from veclip_jax.data.convert_run import OutputLock
from veclip_jax.vecap import checks, prompts
from veclip_jax.vecap.options import CaptionOptions, Resources, VecapError
from veclip_jax.vecap.pipeline import make_vecap
from veclip_jax.vecap.shards import Inputs, plan_shards, read_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 8
BATCH = 2


# --- inputs: demo images in img2dataset tars ---------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _url(k: int) -> str | None:
    return None if k % 4 == 0 else f"http://demo.example/{k}.jpg"  # every 4th sample: no URL


BROKEN, FAILED, DUPLICATE = 7, 100, 101  # an image that does not decode; a failed download; a URL again


def _write_tars(root: str, num_tars: int = 3, per_tar: int = 5) -> str:
    """Demo images with their AltTexts (some empty, some noise) and URLs, and three bad samples."""
    os.makedirs(root, exist_ok=True)
    k = 0
    for t in range(num_tars):
        with tarfile.open(os.path.join(root, f"{t:05d}.tar"), "w") as tar:
            for _ in range(per_tar):
                r = demo.make_record(0, k, 64, 0)
                _add(tar, f"{k:09d}.jpg", b"\xff\xd8 not a jpeg" if k == BROKEN else r.jpeg)
                if r.alt_text is not None:
                    _add(tar, f"{k:09d}.txt", r.alt_text.encode())
                meta = {"status": "success"} | ({"url": _url(k)} if _url(k) else {})
                _add(tar, f"{k:09d}.json", json.dumps(meta).encode())
                k += 1
            if t == 1:
                _add(tar, f"{FAILED:09d}.json", json.dumps({"status": "failed_to_download"}).encode())
                _add(tar, f"{DUPLICATE:09d}.jpg", demo.make_record(0, 1, 64, 0).jpeg)
                _add(tar, f"{DUPLICATE:09d}.json", json.dumps({"status": "success", "url": _url(6)}).encode())
    return os.path.join(root, f"{{00000..{num_tars - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.vecap_models import build_models

    return build_models(str(tmp_path_factory.mktemp("vecap_models")))


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    return _write_tars(str(tmp_path_factory.mktemp("tars")))


def _options(models, **kw) -> CaptionOptions:
    return CaptionOptions(
        captioner=models["captioner"], fuser=models["lm"], max_new_tokens=MAX_NEW_TOKENS, **kw
    )


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clean_run(ray_local, models, tars, tmp_path_factory):
    """(OUT, summary) of one whole run on the demo tars."""
    out = str(tmp_path_factory.mktemp("clean") / "vecap")
    with deadline(240):
        summary = make_vecap(Inputs(webdataset=tars), out, _options(models), Resources(batch_size=BATCH))
    return out, summary


def _files(out: str) -> dict[str, bytes]:
    names = glob.glob(out + "-*-of-*.json") + glob.glob(out + "-*-of-*.provenance.parquet")
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(names)}


# --- rules without a model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "alt, expected",
    [
        (None, "empty"), ("", "empty"), (" \t&nbsp; ", "empty"),
        ("http://x.org/a/b.jpg", "url"), ("www.shop.com/item/3", "url"), ("IMG_4821.jpg", "url"),
        ("DSC01234", "noise"), ("screenshot_2231", "noise"), ("click here to enlarge", "noise"),
        ("image (3)", "noise"), ("thumbnail", "noise"), ("Home page", "noise"), ("untitled-3", "noise"),
        ("42", "noise"),
        ("Red Circle PNG", "text"), ("Boeing 737-800 N8606C at LAX", "text"),
        ("modern kitchen ideas", "text"),
    ],
)  # fmt: skip
def test_alt_texts_are_classified_empty_url_noise_or_text(alt, expected):
    assert checks.classify_alt_text(alt) == expected


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"), ("...", "empty"), ("Caption: ", "empty"),
        ("the the the the the the", "repetitive"), ("a red kite a red kite a red kite", "repetitive"),
        ("a photo of a dog sitting on a sofa", None), ("zzzzzzzzzz", "repetitive"),
        (" ".join(f"w{i}" for i in range(78)), "too_long"), (" ".join(f"w{i}" for i in range(77)), None),
    ],
)  # fmt: skip
def test_outputs_are_checked_for_empty_repetitive_and_far_too_long(text, problem):
    assert checks.output_problem(checks.clean_output(text), max_words=77) == problem


def test_answers_are_cleaned_of_labels_quotes_and_later_paragraphs():
    assert (
        checks.clean_output('Caption: "A red kite over a beach."\n\nNote: I guessed.')
        == "A red kite over a beach."
    )
    assert checks.clean_output("  a\tdog &amp; a cat ") == "a dog & a cat"


def test_a_tied_check_keeps_the_caption():
    assert checks.verdict({"yes": 1.0, "no": 1.0}) and not checks.verdict({"yes": 0.0, "no": 1.0})


def test_prompts_are_hashed_and_their_placeholders_required(models):
    assert prompts.prompt_hash(prompts.FUSION_PROMPT) != prompts.prompt_hash(prompts.FUSION_PROMPT + " ")
    assert len(prompts.prompt_hash("x")) == 16
    with pytest.raises(VecapError, match=r"--fusion_prompt must contain \{alt_text\}"):
        _options(models, fusion_prompt="Caption: {caption}").validate()
    filled = prompts.fill(prompts.FUSION_PROMPT, alt_text="A {b} c", caption="x")
    assert filled.endswith("AltText: A {b} c\nVisual caption: x\nCaption:")


def test_a_shard_is_read_into_the_same_batches_with_every_skip_counted(tars):
    shards = plan_shards(Inputs(webdataset=tars))
    assert [(s.index, s.count, len(s.files)) for s in shards] == [(0, 3, 1), (1, 3, 1), (2, 3, 1)]
    runs = [list(read_batches({"shard": pickle.dumps(shards[1])}, batch_size=BATCH)) for _ in range(2)]
    assert [b["keys"] for b in runs[0]] == [b["keys"] for b in runs[1]]
    batches = runs[0]
    assert [b["batch"] for b in batches] == list(range(len(batches)))
    assert [b["last"] for b in batches] == [False] * (len(batches) - 1) + [True]
    assert [k for b in batches for k in b["keys"]] == ["000000005", "000000006", "000000008", "000000009"]
    skipped = {}
    for b in batches:
        for reason, n in json.loads(b["skipped"]).items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"undecodable_image": 1, "not_success": 1, "duplicate_key": 1}


def test_progress_shows_images_per_second_per_stage_and_an_eta():
    from veclip_jax.vecap.progress import progress_line

    counts = {"images": {"read": 40, "caption": 30, "fuse": 20}, "tokens": {}}
    line = progress_line(counts, time.time() - 10, shards_done=1, shards_total=4, written=20)
    assert line.startswith("read 40 (4.0/s) | caption 30 (3.0/s) | fuse 20 (2.0/s) | written 20 images, 1/4")
    assert line.endswith("| ETA 0m30s")  # 20 images a shard: 60 left at 2 images/s
    assert "ETA" not in progress_line(counts | {"images": {"read": 0}}, time.time() - 1, 0, 4, 0)


def test_vllm_is_used_only_when_installed_on_a_gpu_host(monkeypatch):
    import importlib.util

    from veclip_jax.errors import UserError
    from veclip_jax.vecap.generate import pick_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "vllm" else real(name))
    assert pick_backend("auto", num_gpus=1) == "transformers"
    with pytest.raises(UserError, match="vllm is not installed"):
        pick_backend("vllm", num_gpus=1)
    assert pick_backend("transformers", num_gpus=1) == "transformers"


# --- the models -------------------------------------------------------------------------------


def test_greedy_outputs_do_not_depend_on_the_rest_of_the_batch(models):
    from veclip_jax.vecap.generate import Captioner, TextModel, decode_image

    images = [decode_image(demo.make_record(0, k, 64, 0).jpeg) for k in range(3)]
    captioner = Captioner(models["captioner"], prompts.CAPTION_PROMPT, max_new_tokens=MAX_NEW_TOKENS)
    together = captioner(images).texts
    assert together == [captioner([im]).texts[0] for im in images]
    lm = TextModel(models["lm"], max_new_tokens=MAX_NEW_TOKENS)
    asks = [
        prompts.fill(prompts.CHECK_PROMPT, caption=c)
        for c in ["a", "a red circle on a gray background", *together]
    ]
    batched, alone = lm.answer_scores(asks), [lm.answer_scores([a])[0] for a in asks]
    for t, a in zip(batched, alone, strict=True):  # left padding changes nothing
        assert t == pytest.approx(a, abs=1e-4)
    assert lm.answers_yes(asks) == [checks.verdict(a) for a in alone]
    fusions = [
        prompts.fill(prompts.FUSION_PROMPT, alt_text="red circle", caption=c) for c in ["a", *together]
    ]
    assert lm.complete(fusions).texts == [lm.complete([f]).texts[0] for f in fusions]


# --- the pipeline on Ray ----------------------------------------------------------------------


def test_the_pipeline_writes_the_released_format_per_shard_with_provenance(clean_run):
    out, summary = clean_run
    # One JSON per input shard, named like the converter's shards; nothing else matches OUT-*.json.
    assert sorted(glob.glob(out + "-*.json")) == [f"{out}-{j:05d}-of-00003.json" for j in range(3)]
    assert sorted(os.listdir(os.path.dirname(out))) == sorted(
        [f"vecap-{j:05d}-of-00003.{ext}" for j in range(3) for ext in ("json", "provenance.parquet")]
        + ["vecap.vecap.lock", "vecap.vecap_stats.json"]
    )
    captions, rows = {}, []
    for j in range(3):
        captions |= json.load(open(f"{out}-{j:05d}-of-00003.json"))
        rows += pq.read_table(f"{out}-{j:05d}-of-00003.provenance.parquet").to_pylist()
    assert len(rows) == 14 and summary.captioned == 14  # 15 demo images, one does not decode
    assert summary.skipped == {"not_success": 1, "duplicate_key": 1, "undecodable_image": 1}
    kept = [r for r in rows if r["drop_reason"] is None]
    assert summary.captions == len(kept) == len(captions) > 0
    assert sum(summary.dropped.values()) == len(rows) - len(kept)
    for r in rows:  # the JSON's key: the URL, else the sample's key
        assert (r["url"] or r["key"]) in captions if r["drop_reason"] is None else r["vecap_caption"] is None
        assert r["url"] == _url(int(r["key"]))
        assert r["alt_class"] == checks.classify_alt_text(r["alt_text"])
        assert r["safe"] is not None or r["drop_reason"].startswith("visual_")
        if r["alt_class"] != "text" and r["drop_reason"] is None:
            assert r["vecap_caption"] == r["visual_caption"]  # nothing to fuse: the visual caption
        assert r["caption_prompt_hash"] == prompts.prompt_hash(prompts.CAPTION_PROMPT)
        assert r["fusion_prompt_hash"] == prompts.prompt_hash(prompts.FUSION_PROMPT)
        assert r["checker"] == r["fuser"] == os.path.abspath(_models_of(out)["lm"])
        settings = json.loads(r["generation"])
        assert settings["do_sample"] is False and settings["max_new_tokens"] == MAX_NEW_TOKENS
        assert settings["backend"] == "transformers" and "torch" in settings
    assert any(r["url"] is None for r in kept) or not kept
    stats = json.load(open(out + ".vecap_stats.json"))
    assert stats["captions"] == summary.captions and stats["dropped"] == summary.dropped


def _models_of(out: str) -> dict[str, str]:
    rows = pq.read_table(glob.glob(out + "-00000-*.provenance.parquet")[0]).to_pylist()
    return {"lm": rows[0]["fuser"], "captioner": rows[0]["captioner"]}


def test_a_rerun_keeps_finished_shards_and_remakes_a_lost_one_identically(clean_run, models, tars, tmp_path):
    out0, _ = clean_run
    out = str(tmp_path / "vecap")
    for name, data in _files(out0).items():
        (tmp_path / name).write_bytes(data)
    original = _files(out)
    for ext in ("json", "provenance.parquet"):  # shard 1 lost; a killed run's temporary files left
        os.remove(f"{out}-00001-of-00003.{ext}")
    (tmp_path / "vecap-00001-of-00003.json.tmp4242").write_text("{")
    (tmp_path / "vecap-00001-of-00003.provenance.parquet.tmp4242").write_text("x")
    before = {p: os.stat(p) for p in glob.glob(out + "-0000[02]-*")}
    with deadline(180):
        summary = make_vecap(Inputs(webdataset=tars), out, _options(models), Resources(batch_size=BATCH))
    assert (summary.written, summary.reused) == (1, 2)
    for p, st in before.items():  # finished shards are not rewritten
        assert (os.stat(p).st_mtime_ns, os.stat(p).st_ino) == (st.st_mtime_ns, st.st_ino), p
    assert _files(out) == original  # greedy: the remade shard is byte for byte the first run's
    assert not glob.glob(out + "*.tmp*")


def test_a_second_run_on_the_same_output_is_refused(models, tars, tmp_path):
    out = str(tmp_path / "vecap")
    lock = OutputLock(out + ".vecap").acquire()  # another run holds it
    try:
        with pytest.raises(VecapError, match=r"being captioned by another run \(\{\"host\""):
            make_vecap(Inputs(webdataset=tars), out, _options(models))
    finally:
        lock.release()
    assert not glob.glob(out + "-*")


def test_a_rerun_with_other_settings_is_refused(clean_run, models, tars, tmp_path):
    out0, _ = clean_run
    out = str(tmp_path / "vecap")
    for name, data in _files(out0).items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(VecapError, match=r"made with other .* \(differs in: fusion_prompt_hash\)"):
        make_vecap(Inputs(webdataset=tars), out, _options(models, fusion_prompt="{alt_text} + {caption} ="),
                   Resources(batch_size=BATCH))  # fmt: skip


def test_the_captions_join_into_records_by_url_and_by_key_and_feed_training(clean_run, tars, tmp_path):
    out, _ = clean_run
    captions = {}
    for p in glob.glob(out + "-*.json"):
        captions |= json.load(open(p))
    train = str(tmp_path / "train")
    summary = convert.convert_webdataset(tars, train, 3, vecap_json=out + "-*.json", workers=1)
    got = {r.key: r for r in records.RecordReader(f"{train}-*{records.SHARD_SUFFIX}")}
    assert summary.vecap_joined == len(captions) > 0
    joined_by_key = 0
    for key, r in got.items():
        join = _url(int(key)) or key
        assert r.vecap_text == captions.get(join), key
        joined_by_key += r.vecap_text is not None and _url(int(key)) is None
    assert joined_by_key > 0  # samples without a URL are joined by their key

    from veclip_jax.data import pipeline, tokenizer
    from veclip_jax.defaults import get_config

    files = f"{train}-*{records.SHARD_SUFFIX}"
    config = get_config()
    config.batch_size = 4
    config.data.train_files = files
    config.data.tokenizer = tokenizer.train_tokenizer_from_shards(
        files, tmp_path / "spm.model", vocab_size=100
    )
    config.data.vecap_prob = 0.5  # VeCLIP's mix
    config.data.num_workers = 0
    it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    try:
        batch = next(it)
    finally:
        it.close()
    assert batch["tokens"].shape[0] == 4


def test_image_folders_and_tables_without_urls_join_by_key(tmp_path):
    # What make_vecap writes for inputs without URLs: {key: caption}, the key being the converter's.
    for k, cls in enumerate(["cat", "cat", "dog"]):
        os.makedirs(tmp_path / "pets" / cls, exist_ok=True)
        (tmp_path / "pets" / cls / f"{k}.jpg").write_bytes(demo.make_record(0, k, 64, 0).jpeg)
    (tmp_path / "vecap-00000-of-00001.json").write_text(
        json.dumps({"cat/0.jpg": "A red circle.", "dog/2.jpg": "A cross."})
    )
    vecap = str(tmp_path / "vecap-*.json")
    convert.convert_image_folder(str(tmp_path / "pets"), str(tmp_path / "f"), 1, vecap_json=vecap)
    got = {r.key: r.vecap_text for r in records.RecordReader(str(tmp_path / "f-*.array_record"))}
    assert got == {"cat/0.jpg": "A red circle.", "dog/2.jpg": "A cross."}  # cat/1.jpg: no caption at all
    (tmp_path / "pairs.csv").write_text("image,alt_text\npets/cat/0.jpg,a cat\npets/dog/2.jpg,a dog\n")
    (tmp_path / "vecap-00000-of-00001.json").write_text(json.dumps({"1": "A green cross."}))
    convert.convert_table(str(tmp_path / "pairs.csv"), str(tmp_path / "t"), 1, vecap_json=vecap)
    got = {r.key: r.vecap_text for r in records.RecordReader(str(tmp_path / "t-*.array_record"))}
    assert got == {"0": None, "1": "A green cross."}  # a table's key: the key column, else the row number


def test_dry_run_prints_the_plan_without_captioning(models, tars, tmp_path, capsys):
    from veclip_jax.cli.make_vecap import main

    out = str(tmp_path / "vecap")
    argv = [f"--webdataset={tars}", f"--captioner={models['captioner']}", f"--fuser={models['lm']}",
            f"--out={out}", f"--max_new_tokens={MAX_NEW_TOKENS}", "--dry_run"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 of 3 shards to caption (0 done), 16 images" in printed, printed  # 16 with an image member
    assert "generated tokens in all" in printed and "tokens/s per accelerator" in printed
    assert not glob.glob(out + "*")
    assert main([*argv, "--measure=4", "--batch_size=2"]) == 0  # the real models timed here
    printed = capsys.readouterr().out
    assert "measured on 4 images (cpu, batch 2)" in printed and "generated tokens/s" in printed, printed
    assert "estimate:" in printed and not glob.glob(out + "*")
    assert main([*argv, "--check_prompt=no placeholder"]) == 2
    assert capsys.readouterr().err.strip() == "error: --check_prompt must contain {caption}"


def test_a_model_of_the_wrong_kind_is_named_before_anything_runs(models, tars, tmp_path, capsys):
    from veclip_jax.cli.make_vecap import main

    argv = [f"--webdataset={tars}", f"--out={tmp_path / 'vecap'}"]
    assert main([*argv, f"--captioner={models['lm']}", f"--fuser={models['lm']}"]) == 2
    assert capsys.readouterr().err.strip().endswith("a llama model, not an image-text-to-text one")
    assert main([*argv, f"--captioner={models['captioner']}", f"--fuser={models['captioner']}"]) == 2
    assert capsys.readouterr().err.strip().endswith("a llava model, not a causal language model")
    assert main([*argv, f"--captioner={tmp_path}", f"--fuser={models['lm']}"]) == 2
    assert "not a local HuggingFace model directory" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "vecap*"))


# --- slow: the command killed mid-run, resumed; training on the joined records ----------------


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_clean_runs_files(ray_local, models, tmp_path):
    many = _write_tars(str(tmp_path / "tars"), num_tars=6, per_tar=3)  # six shards: some still in flight
    out, clean = str(tmp_path / "killed" / "vecap"), str(tmp_path / "clean" / "vecap")
    with deadline(240):
        make_vecap(Inputs(webdataset=many), clean, _options(models), Resources(batch_size=1))
    cmd = [sys.executable, os.path.join(ROOT, "launch", "make_vecap.py"), f"--webdataset={many}",
           f"--captioner={models['captioner']}", f"--fuser={models['lm']}", f"--out={out}",
           f"--max_new_tokens={MAX_NEW_TOKENS}", "--batch_size=1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        t0 = time.time()
        while not glob.glob(out + "-*.json") and time.time() - t0 < 300 and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    finally:
        proc.wait(timeout=60)
    finished = glob.glob(out + "-*.json")
    assert 1 <= len(finished) < 6, finished  # killed after a shard was done, before the last one
    before = {p: os.stat(p) for p in finished}
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({6 - len(finished)} written now, {len(finished)} done before)" in rerun.stdout
    for p, st in before.items():  # finished shards are not rewritten
        assert (os.stat(p).st_mtime_ns, os.stat(p).st_ino) == (st.st_mtime_ns, st.st_ino), p
    assert _files(out) == _files(clean)
    assert not glob.glob(out + "*.tmp*")


@pytest.mark.slow
def test_the_joined_records_train_with_the_veclip_mix(clean_run, tars, tmp_path):
    out, _ = clean_run
    train = str(tmp_path / "train")
    convert.convert_webdataset(tars, train, 3, vecap_json=out + "-*.json", workers=1)
    from veclip_jax.data import tokenizer

    files = f"{train}-*{records.SHARD_SUFFIX}"
    spm = tokenizer.train_tokenizer_from_shards(files, tmp_path / "spm.model", vocab_size=100)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
           f"--workdir={tmp_path / 'run'}", f"--config.data.train_files={files}",
           f"--config.data.tokenizer={spm}",
           "--config.data.vecap_prob=0.5", "--config.total_steps=2", "--config.batch_size=8",
           "--config.eval_every=0", "--config.checkpoint_every=0",
           "--config.optim.warmup_steps=0"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]


def test_images_reads_the_input_kind_from_the_spec(tmp_path, capsys):
    from veclip_jax.cli import make_vecap

    for name in ("a.tar", "b.tar", "t.parquet", "pairs.csv", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    model_flags = ["--captioner=/m/c", "--fuser=/m/f", f"--out={tmp_path}/o"]
    want = {f"{tmp_path}/*.tar": "webdataset", f"{tmp_path}/t.parquet": "parquet",
            f"{tmp_path}/pairs.csv": "table", f"{tmp_path}/folder": "image_folder"}  # fmt: skip
    for spec, kind in want.items():
        args = make_vecap.parse_args([f"--images={spec}", *model_flags])
        assert getattr(args, kind) == spec and make_vecap.input_kind(spec) == kind
    # mixed kinds, or an extension no reader takes: one line naming the explicit flags, exit 2
    for spec in (f"{tmp_path}/a.tar,{tmp_path}/t.parquet", f"{tmp_path}/notes.txt"):
        assert make_vecap.main([f"--images={spec}", *model_flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--webdataset, --parquet, --table or --image_folder" in err[0]
