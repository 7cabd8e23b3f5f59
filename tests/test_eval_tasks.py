"""The tasks with a real (tiny) model: the same numbers on 1 device, 8 devices and two processes;
launch/eval.py end to end (table, CLIP_benchmark JSON files, eval.jsonl, the numbers training
logged); the registry inside training, each entry at its own `every`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import veclip_jax
from tests.test_multihost import _two_hosts
from veclip_jax.eval import registry
from veclip_jax.eval.embed import embed_images
from veclip_jax.eval.run import run_tasks
from veclip_jax.run.workdir import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
WORKER = os.path.join(os.path.dirname(__file__), "eval_multihost_worker.py")


def _image(rng, colour, size):
    arr = np.clip(np.asarray(colour) + rng.normal(0, 40, size=(size[1], size[0], 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """An ImageFolder tree of noisy colours (train/ and test/; 13 test images: batches get padded)
    and a Flickr30k-style Karpathy split (11 images, 1 to 4 captions each)."""
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        for name, colour in COLOURS.items():
            os.makedirs(root / "colours" / split / name)
            for i in range(n - (split == "test" and name == "blue") * 2):
                _image(rng, colour, (40, 30)).save(root / "colours" / split / name / f"{i}.png")
    (root / "colours" / "templates.txt").write_text("a {} shape.\nan image of a {} object.\n")
    images = []
    os.makedirs(root / "flickr30k" / "flickr30k-images")
    for i in range(13):
        name = list(COLOURS)[i % 3]
        _image(rng, COLOURS[name], (30, 44)).save(root / "flickr30k" / "flickr30k-images" / f"{i}.jpg")
        sentences = [{"raw": f"a {name} object number {j}."} for j in range(1 + i % 4)]
        images.append(dict(filename=f"{i}.jpg", split="test" if i < 11 else "train", sentences=sentences))
    (root / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    return str(root)


def _entries(data_dir: str) -> dict:
    folder = os.path.join(data_dir, "colours")
    return {
        "colours": dict(type="zeroshot_classification", dataset=f"folder:{folder}"),
        "probe": dict(type="linear_probe", dataset=f"folder:{folder}", split="test", train_split="train"),
        "flickr30k": registry.standard_task("flickr30k"),
    }


def _flat_params(params) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


def test_same_numbers_on_one_device_eight_devices_and_two_processes(tiny_run, data_dir, tmp_path):
    workdir, _ = tiny_run
    model = veclip_jax.load(workdir)
    params = jax.device_get(model.params)
    args = (model.model, params, model.tokenizer, model.preprocess, _entries(data_dir))
    eight, ev8 = run_tasks(*args, data_dir=data_dir, batch_size=8)
    one, ev1 = run_tasks(*args, data_dir=data_dir, batch_size=8, devices=jax.devices()[:1])
    assert set(eight) == {"colours", "probe", "flickr30k"}
    recalls = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert set(eight["flickr30k"]) == recalls
    for task in eight:
        assert one[task] == pytest.approx(eight[task], abs=1e-9), task

    # The embeddings themselves, against the API's encode_image (one device, its own batches).
    task = ev8.tasks[0]
    source = task.data.source
    emb8, labels, _ = embed_images(task.ctx.encoders, jax.device_put(params), source, model.preprocess)
    paths = [task.data.source[i]["image"] for i in range(len(task.data.source))]
    want = model.encode_image([Image.open(p).convert("RGB") for p in paths])
    np.testing.assert_allclose(emb8, want, atol=2e-6)
    assert list(labels) == [0] * 3 + [1] * 5 + [2] * 5  # blue (2 fewer), green, red: sorted folders

    # Two processes of 4 devices: each embeds its own slice of every dataset.
    np.savez(tmp_path / "params.npz", **_flat_params(params))
    spec = dict(params=str(tmp_path / "params.npz"), workdir=workdir, entries=_entries(data_dir),
                data_dir=data_dir, batch_size=8, out=str(tmp_path / "p{}.json"))  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    _two_hosts(WORKER, str(tmp_path / "spec.json"))
    reads = []
    for pid in range(2):
        got = json.loads((tmp_path / f"p{pid}.json").read_text())
        reads.append(got["reads"])
        assert set(got["results"]) == set(eight)
        for task in eight:
            assert got["results"][task] == pytest.approx(eight[task], abs=1e-9), (pid, task)
    # Each image was decoded once, by one process: 13 test images (zero-shot; the probe's test split
    # reuses their embeddings), 36 training images, 11 retrieval images; half each.
    both = reads[0] + reads[1]
    assert len(both) == len(set(both)) == 13 + 36 + 11 and abs(len(reads[0]) - len(reads[1])) <= 3


def _eval_cli(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "eval.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_launch_eval_writes_the_table_benchmark_files_and_eval_jsonl(tiny_run, data_dir, tmp_path):
    src, trained = tiny_run
    workdir = str(tmp_path / "run")
    shutil.copytree(src, workdir)
    before = read_jsonl(os.path.join(workdir, "eval.jsonl"))
    folder = os.path.join(data_dir, "colours")
    tasks = f"demo_color,demo_retrieval,folder:{folder},flickr30k,linear_probe:folder:{folder}"
    out = _eval_cli(f"--model={workdir}", f"--tasks={tasks}", f"--data_dir={data_dir}",
                    f"--output_dir={tmp_path / 'out'}", "--batch_size=16")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout.splitlines()
    header = next(line for line in table if line.startswith("| model"))
    assert header.split(" | ")[1:3] == ["Flickr I2T R@1", "Flickr T2I R@1"]  # the paper's column order
    assert "folder_colours linear probe" in header and "img/s" in out.stderr  # tqdm's rate
    assert "nan" not in out.stdout  # a task whose images another task embedded prints no rate of NaN
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == sorted(f"{k}.json" for k in ("demo_color", "demo_retrieval", "folder_colours",
                                                "flickr30k", "linear_probe_folder_colours"))  # fmt: skip
    dump = json.loads((tmp_path / "out" / "flickr30k.json").read_text())
    assert dump["task"] == "zeroshot_retrieval" and dump["dataset"] == "flickr30k" and dump["step"] == 8
    assert "image_retrieval_recall@1" in dump["metrics"] and "text_retrieval_recall@10" in dump["metrics"]
    probe = json.loads((tmp_path / "out" / "linear_probe_folder_colours.json").read_text())
    assert probe["task"] == "linear_probe" and {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"} <= set(
        probe["metrics"]
    )
    after = read_jsonl(os.path.join(workdir, "eval.jsonl"))
    assert after[:-1] == before and after[-1]["step"] == 8
    # The standalone run of a training entry gives exactly what training logged for the same parameters.
    for key in ("demo_color/acc1", "demo_color/acc5", "demo_retrieval/text_retrieval_recall@5"):
        assert after[-1][key] == trained.eval[key]


def test_launch_eval_refuses_missing_data_and_unknown_tasks(tiny_run, tmp_path):
    workdir, _ = tiny_run
    out = _eval_cli(f"--model={workdir}", "--tasks=imagenet", f"--data_dir={tmp_path}")
    assert out.returncode == 2 and "tfds build imagenet2012" in out.stderr, out.stderr[-2000:]
    out = _eval_cli(f"--model={workdir}", "--tasks=coco", f"--data_dir={tmp_path}")
    assert out.returncode == 2 and "dataset_coco.json" in out.stderr and "Traceback" not in out.stderr
    out = _eval_cli(f"--model={workdir}", "--tasks=imagenet22k")
    assert out.returncode == 2 and "unknown task 'imagenet22k'" in out.stderr


def test_training_runs_each_entry_at_its_own_every(demo_cache, data_dir, tmp_path, monkeypatch):
    from tests.helpers import tiny_run_config
    from veclip_jax.data import image_ops
    from veclip_jax.train import loop

    folder = os.path.join(data_dir, "colours")
    config = tiny_run_config(demo_cache, total_steps=4, eval_every=4, checkpoint_every=0)
    config.evals = dict(
        colours=dict(type="zeroshot_classification", dataset=f"folder:{folder}", every=1, max_examples=7),
        demo_size=config.evals.demo_size.to_dict(),
    )
    # ... with config.eval_fast_decode: the evaluator's preprocessing decodes what the data stores
    config.eval_fast_decode = True
    handed = []
    real_load = image_ops.EvalPreprocess.load
    monkeypatch.setattr(
        image_ops.EvalPreprocess, "load", lambda self, im: handed.append(type(im)) or real_load(self, im)
    )
    result = loop.train(config, str(tmp_path))
    assert set(handed) == {str, bytes}  # the folder's file paths, the demo records' JPEG bytes
    lines = read_jsonl(os.path.join(tmp_path, "eval.jsonl"))
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert set(lines[0]) == {"step", "colours/acc1", "colours/acc5", "colours/mean_per_class_recall"}
    assert {"demo_size/acc1", "colours/acc1"} <= set(lines[-1]) and result.eval == {
        k: v for k, v in lines[-1].items() if k != "step"
    }
    assert lines[0]["colours/acc1"] * 7 == round(lines[0]["colours/acc1"] * 7)  # 7 images evaluated


def test_fast_decode_embeds_near_the_exact_pixels_and_only_for_bicubic(
    tiny_run, data_dir, tmp_path, monkeypatch
):
    import dataclasses

    from veclip_jax.data import image_ops
    from veclip_jax.eval.run import evaluate
    from veclip_jax.run.load import load_model

    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], workdir)  # evaluate() appends to the run's eval.jsonl
    loaded = load_model(workdir)
    assert not loaded.preprocess.fast  # the default is HF's exact pixels
    fast = dataclasses.replace(loaded.preprocess, fast=True)
    # The embedding pass hands a fast preprocessing what the dataset stores (a file path here), and
    # it decodes it itself; the exact one gets load_image's decoded image, as before.
    handed = []
    real_load = image_ops.EvalPreprocess.load
    monkeypatch.setattr(
        image_ops.EvalPreprocess, "load", lambda self, im: handed.append(im) or real_load(self, im)
    )
    entries = {"flickr30k": registry.standard_task("flickr30k")}
    args = (loaded.model, jax.device_get(loaded.params), loaded.tokenizer, loaded.preprocess, entries)
    _, ev = run_tasks(*args, data_dir=data_dir, batch_size=8)
    task = ev.tasks[0]
    params = jax.device_put(loaded.params)
    exact_emb, _, _ = embed_images(task.ctx.encoders, params, task.data.source, loaded.preprocess)
    assert not handed
    fast_emb, _, _ = embed_images(task.ctx.encoders, params, task.data.source, fast)
    assert len(handed) == len(task.data.source) and all(isinstance(p, str) for p in handed)
    norms = np.linalg.norm(exact_emb, axis=-1) * np.linalg.norm(fast_emb, axis=-1)
    cos = np.sum(exact_emb * fast_emb, -1) / norms
    assert cos.min() > 0.999 and not np.array_equal(exact_emb, fast_emb)  # near, and really the fast path

    out = evaluate(workdir, ["flickr30k"], data_dir=data_dir, output_dir=str(tmp_path / "o"), batch_size=8,
                   progress=False, loaded=loaded, fast_decode=True)  # fmt: skip
    assert set(out.results["flickr30k"]) >= {"image_retrieval_recall@1"}
    tf = dataclasses.replace(loaded, preprocess=image_ops.EvalPreprocess(32, 32, "tf_bilinear"))
    with pytest.raises(ValueError, match="fast_decode.*tf_bilinear"):
        evaluate(workdir, ["flickr30k"], data_dir=data_dir, loaded=tf, fast_decode=True, progress=False)
