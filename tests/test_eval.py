"""Evaluation pieces without a model: metrics against direct counts and sklearn, the linear-probe
protocol, the registry and its config check, the packaged class names and templates, and the
dataset readers (ImageFolder, Karpathy JSON, TFDS through tensorflow_datasets' mock_data)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from veclip_jax.data import image_ops
from veclip_jax.eval import classnames, datasets, registry
from veclip_jax.eval.linear_probe import C_SWEEP, _fit, linear_probe, split_validation
from veclip_jax.eval.retrieval import retrieval_recall
from veclip_jax.eval.zeroshot import class_embeddings, prompts, zeroshot_metrics


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- metrics ------------------------------------------------------------------------------------


def test_retrieval_recall_matches_a_direct_count_with_several_captions_per_image():
    rng = np.random.default_rng(0)
    img = _unit(rng.normal(size=(20, 8)))
    owner = np.repeat(np.arange(20), 3)[:50]  # up to 3 captions per image; images 17.. have none
    txt = _unit(img[owner] + 0.8 * rng.normal(size=(50, 8)))
    got = retrieval_recall(img, txt, owner, ks=(1, 5), chunk=7)  # chunks that do not divide the sets
    sim = img @ txt.T
    for k in (1, 5):
        i2t = [np.isin(np.argsort(-sim[i])[:k], np.flatnonzero(owner == i)).any() for i in range(17)]
        t2i = [owner[t] in np.argsort(-sim[:, t])[:k] for t in range(50)]
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(np.mean(i2t))  # image -> text (I2T)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(np.mean(t2i))  # text -> image (T2I)
    assert 0 < got["text_retrieval_recall@1"] < got["text_retrieval_recall@5"] < 1
    perfect = retrieval_recall(img, img, np.arange(20), ks=(1,))
    assert perfect == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


def test_zero_shot_averages_normalised_prompt_embeddings():
    rng = np.random.default_rng(1)
    table = {}

    def encode(texts):
        for t in texts:
            table.setdefault(t, _unit(rng.normal(size=4)))
        return np.stack([table[t] for t in texts])

    classes, templates = ["red", "blue"], ["a {}.", "the {} one."]
    assert prompts(classes, templates) == ["a red.", "the red one.", "a blue.", "the blue one."]
    got = class_embeddings(encode, classes, templates)
    want = _unit(np.stack([np.mean([table[t.format(c)] for t in templates], axis=0) for c in classes]))
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_zero_shot_metrics_equal_sklearns():
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    rng = np.random.default_rng(2)
    classes = _unit(rng.normal(size=(12, 16)))
    labels = rng.integers(0, 12, size=300)
    labels[labels == 11] = 10  # a class without images: absent from the per-class mean
    images = _unit(classes[labels] + 1.3 * rng.normal(size=(300, 16)))
    got = zeroshot_metrics(images, classes, labels, chunk=64)
    scores = images @ classes.T
    assert got["acc1"] == pytest.approx(np.mean(scores.argmax(1) == labels))
    assert got["acc5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=5, labels=np.arange(12)))
    assert got["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, scores.argmax(1)))
    assert 0.2 < got["acc1"] < got["acc5"] < 1 and got["mean_per_class_recall"] != got["acc1"]


def test_linear_probe_follows_clips_protocol(monkeypatch):
    from veclip_jax.eval import linear_probe as lp_module

    fits = []  # (rows, C) of every fit
    monkeypatch.setattr(lp_module, "_fit", lambda x, y, c, it: fits.append((len(x), c)) or _fit(x, y, c, it))
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 4))
    y = rng.integers(0, 3, size=200)
    x = 0.005 * (centres[y] + 1.2 * rng.normal(size=(200, 4)))  # small features: C = 1 underfits
    train_x, train_y, test_x, test_y = x[:120], y[:120], x[120:], y[120:]
    metrics, c = linear_probe(train_x, train_y, test_x, test_y, 3, val_fraction=0.25, search_steps=2)
    fit, val = split_validation(train_y, 0.25, seed=0)
    assert not set(fit) & set(val) and len(val) == 30 and sorted([*fit, *val]) == list(range(120))

    def val_acc(c):
        clf = _fit(train_x[fit], train_y[fit], c, 1000)
        return np.mean(clf.predict(train_x[val]) == train_y[val])

    assert val_acc(c) >= max(val_acc(g) for g in C_SWEEP)  # the search never loses to the sweep
    assert 10 < c < C_SWEEP[-1]  # weak regularisation wins on these small features, but not none
    assert val_acc(c) > val_acc(1.0) + 0.1
    assert fits[-1] == (120, c) and all(n == 90 for n, _ in fits[:-1])  # searched on 90, refitted on all
    assert {c for _, c in fits[:-1]} >= set(C_SWEEP)  # the whole sweep, 1e-6 .. 1e6
    refit = _fit(train_x, train_y, c, 1000)
    assert metrics["lp_acc1"] == pytest.approx(np.mean(refit.predict(test_x) == test_y))
    assert metrics["lp_acc1"] > 0.5 and set(metrics) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}


# --- registry and config ------------------------------------------------------------------------------


def test_standard_tasks_are_valid_entries():
    names = ["imagenet", "imagenet_v2", "coco", "flickr30k", "cifar10", "cifar100", "linear_probe:cifar10",
             "folder:/data/pets", "linear_probe:folder:/data/pets", "tfds:svhn_cropped:test[:9]"]  # fmt: skip
    for name in names:
        registry.check_entry(registry.task_key(name), registry.standard_task(name))
    assert registry.standard_task("imagenet") == dict(
        type="zeroshot_classification", dataset="tfds:imagenet2012", split="validation",
        classnames="imagenet1k", templates="clip_80",
    )  # fmt: skip
    assert registry.standard_task("coco")["dataset"] == "karpathy:coco/dataset_coco.json"
    assert registry.standard_task("linear_probe:folder:/d")["split"] == "test"
    assert registry.task_key("folder:/data/pets/") == "folder_pets"
    assert registry.task_key("linear_probe:cifar10") == "linear_probe_cifar10"
    with pytest.raises(ValueError, match="unknown task 'imagenet21k'"):
        registry.standard_task("imagenet21k")
    with pytest.raises(ValueError, match="classification dataset"):
        registry.standard_task("linear_probe:coco")


@pytest.mark.parametrize(
    "entry, field",
    [
        (dict(type="zeroshot", dataset="tfds:x"), "x.type"),
        (dict(type="retrieval", dataset="tfds:x"), "x.dataset"),
        (dict(type="linear_probe", dataset="karpathy:a.json"), "x.dataset"),
        (dict(type="zeroshot_classification", dataset="demo"), "x.label_field"),
        (dict(type="zeroshot_classification", dataset="tfds:x", recall_at=(1,)), "x.recall_at is not a"),
        (dict(type="zeroshot_classification", dataset="tfds:x", templates=("no slot",)), "x.templates"),
        (dict(type="retrieval", dataset="demo", recall_at=(0, 5)), "x.recall_at"),
        (dict(type="linear_probe", dataset="tfds:x", val_fraction=1.0), "x.val_fraction"),
        (dict(type="linear_probe", dataset="tfds:x", every="10"), "x.every='10': expected int"),
    ],
)
def test_bad_entries_are_refused_by_field(entry, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        registry.check_entry("x", entry)


# --- class names and templates --------------------------------------------------------------------------


def test_packaged_class_names_and_templates():
    sizes = dict(imagenet1k=1000, cifar10=10, cifar100=100, pets=37, flowers=102, caltech101=102)
    for name, n in sizes.items():
        names = classnames.load_classnames(name)
        assert len(names) == n and all("{" not in c and c == c.strip() for c in names)
    assert classnames.load_classnames("imagenet1k")[:2] == ["tench", "goldfish"]
    assert classnames.load_classnames("cifar100")[1] == "aquarium fish"
    clip80 = classnames.load_templates("clip_80")
    assert len(clip80) == 80 and clip80[0] == "a bad photo of a {}." and len(set(clip80)) == 80
    for name in classnames.packaged("templates"):
        assert classnames.load_templates(name)
    for name, (_, _, _, cls, tmpl) in registry._CLASSIFICATION.items():
        assert not cls or cls in classnames.packaged("classnames"), name
        assert tmpl in classnames.packaged("templates"), name
    with pytest.raises(ValueError, match="holds '{}' once"):
        classnames.load_templates(("a {} and a {}.",))
    assert classnames.readable("/a/apartment_building/outdoor") == "apartment building outdoor"


# --- datasets -------------------------------------------------------------------------------------------


def _write_image(path, colour, size=(20, 14)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_reads_classes_names_and_templates(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls, colour in (("golden_retriever", (200, 150, 0)), ("tabby", (90, 90, 90))):
            for i in range(n):
                _write_image(str(tmp_path / split / cls / "sub" / f"{i}.png"), colour)
    (tmp_path / "test" / "tabby" / "notes.txt").write_text("not an image")
    data = datasets.image_folder(str(tmp_path))  # no split: DIR/test
    assert data.classnames == ["golden retriever", "tabby"] and data.templates is None
    assert len(data.source) == 4 and [data.source[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    assert data.source[0]["image"].endswith("test/golden_retriever/sub/0.png")
    (tmp_path / "classnames.txt").write_text("retriever\ncat\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n\nan image of a {}.\n")
    data = datasets.image_folder(str(tmp_path), "train")
    assert data.classnames == ["retriever", "cat"] and len(data.source) == 6
    assert data.templates == ["a photo of a {}.", "an image of a {}."]
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(datasets.DatasetError, match="1 class names for 2"):
        datasets.image_folder(str(tmp_path), "train")
    with pytest.raises(datasets.DatasetError, match="no folder"):
        datasets.image_folder(str(tmp_path), "validation")


def test_karpathy_json_gives_every_test_image_with_all_its_captions(tmp_path):
    images = []
    for i, split in enumerate(["test", "train", "test", "restval"]):
        _write_image(str(tmp_path / "val2014" / f"{i}.jpg"), (i * 40, 0, 0))
        images.append(dict(filepath="val2014", filename=f"{i}.jpg", split=split,
                           sentences=[{"raw": f"image {i} caption {j} "} for j in range(5 - i)]))  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    data = datasets.karpathy(str(tmp_path / "dataset_coco.json"), str(tmp_path), "test")
    assert len(data.source) == 2 and data.source[1]["image"].endswith("val2014/2.jpg")
    assert data.captions == [[f"image {i} caption {j}" for j in range(5 - i)] for i in (0, 2)]
    with pytest.raises(datasets.DatasetError, match="missing"):
        datasets.karpathy(str(tmp_path / "dataset_coco.json"), str(tmp_path / "elsewhere"), "test")
    with pytest.raises(datasets.DatasetError, match="README"):
        datasets.karpathy(str(tmp_path / "nope.json"), str(tmp_path), "test")


@pytest.mark.parametrize(
    "task, n_classes", [("imagenet", 1000), ("imagenet_v2", 1000), ("cifar10", 10), ("cifar100", 100)]
)
def test_tfds_data_sources_without_tensorflow(task, n_classes, tmp_path):
    import sys

    import tensorflow_datasets as tfds

    entry = registry.standard_task(task)
    builder = entry["dataset"].split(":")[1]
    with tfds.testing.mock_data(num_examples=6):
        data = datasets.tfds_classification(builder, entry["split"], str(tmp_path))
    assert "tensorflow" not in sys.modules
    assert len(data.source) == 6 and len(data.classnames) == n_classes
    ex = data.source[3]
    assert 0 <= ex["label"] < n_classes
    image = datasets.load_image(ex["image"])  # mock images have random shapes
    out = image_ops.EvalPreprocess(16, 16)(image)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8  # pixels: the model normalises them
    assert len(classnames.load_classnames(entry["classnames"])) == n_classes  # our names fit TFDS's labels


def test_missing_tfds_data_says_how_to_get_it(tmp_path):
    with pytest.raises(datasets.DatasetError, match="tfds build imagenet2012 --file_format=array_record"):
        datasets.tfds_classification("imagenet2012", "validation", str(tmp_path))


def test_greyscale_arrays_become_rgb():
    assert datasets.load_image(np.zeros((5, 4, 1), np.uint8)).shape == (5, 4, 3)
    assert datasets.load_image(np.zeros((5, 4), np.uint8)).shape == (5, 4, 3)
