"""The task layer's numbers counted by hand: zero-shot top-1/top-5 with a dataset's own class names and
templates, and retrieval recall@k with several captions per image, against plain numpy loops.

The encoders are a stub whose embeddings the test chooses: an image's embedding is looked up by the
id painted into its pixels, a text's by the text itself. So the only thing under test is what the
task layer does with the data (which prompts it builds, how it averages them into classes, how it
ranks), and the expected numbers need no model. A prompt the test did not plan for (one of CLIP's 80
templates, a folder name instead of classnames.txt) gets an embedding of its own that scores wrong.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest
from PIL import Image

from veclip_jax.eval import registry, tasks
from veclip_jax.eval.classnames import CLIP_TEMPLATES, load_templates

DIM = 8
SIZE = 4  # the stub model's image side: each image is its id in every pixel
CLASSNAMES = ["cat", "dog", "fox", "owl", "bee", "elk", "yak", "emu"]  # classnames.txt, label order
PER_CLASS = [2, 3, 1, 2, 2, 3, 2, 1]  # images per class: 16
TEMPLATES = ["a {} seen in the by-hand test.", "crayon drawing of a {}"]  # the dataset's templates.txt
CAPTIONS_PER_IMAGE = [2, 3, 2, 3, 2, 2]  # retrieval: 6 images, 14 captions
RECALL_AT = (1, 2, 3)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _Tokenizer:
    """Each distinct text gets one id: a "token row" [id] that the stub encoders turn back into text."""

    def __init__(self):
        self.texts: list[str] = []

    def encode_batch(self, texts):
        ids = []
        for t in texts:
            if t not in self.texts:
                self.texts.append(t)
            ids.append([self.texts.index(t)])
        return np.asarray(ids, np.int32)


class _Towers:
    image_size, embed_dim = SIZE, DIM


class _Model:
    towers = _Towers()


class _Encoders:
    """The pooled encoders' interface over lookup tables: image id -> embedding, text -> embedding."""

    scoring = "pooled"
    model = _Model()
    local_batch_size = 4  # several batches, the last one padded

    def __init__(self, tokenizer: _Tokenizer, images: dict[int, np.ndarray], texts: dict[str, np.ndarray]):
        self.tokenizer, self.image_table, self.text_table = tokenizer, images, texts

    def texts(self, params, rows, progress=None):
        out = []
        for (i,) in np.asarray(rows):
            text = self.tokenizer.texts[i]
            if text in self.text_table:
                out.append(self.text_table[text])
            else:  # an unplanned prompt: a fixed vector of its own
                out.append(np.random.default_rng(zlib.crc32(text.encode())).normal(size=DIM))
        if progress:
            progress(len(out))
        return _unit(np.asarray(out, np.float64)).astype(np.float32)

    def image_batch(self, params, images, tags):
        ids = np.rint(images[:, 0, 0, 0]).astype(int)
        emb = np.stack([self.image_table.get(int(i), np.ones(DIM)) for i in ids])
        return _unit(emb).astype(np.float32), tags


def _preprocess(image):
    """Keeps the painted id: [SIZE, SIZE, 3] all equal to the image's first pixel."""
    return np.full((SIZE, SIZE, 3), np.asarray(image)[0, 0, 0], np.float32)


def _save(path, image_id: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((6, 5, 3), image_id, np.uint8)).save(path)  # PNG: lossless


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The two datasets on disk and the embeddings the stub encoders give their images and texts."""
    root = tmp_path_factory.mktemp("by_hand")
    rng = np.random.default_rng(7)
    images: dict[int, np.ndarray] = {}
    texts: dict[str, np.ndarray] = {}

    # Zero-shot: an ImageFolder tree with its own classnames.txt and templates.txt. Class k's prompts
    # lie near a direction of its own; an image lies near its class's direction, with enough noise
    # that some images are misclassified.
    direction = rng.normal(size=(len(CLASSNAMES), DIM))
    for k, name in enumerate(CLASSNAMES):
        for t in TEMPLATES:
            texts[t.format(name)] = direction[k] + 0.8 * rng.normal(size=DIM)
    labels, image_id = [], 1
    for k, n in enumerate(PER_CLASS):
        for j in range(n):
            _save(root / "animals" / f"class{k}" / f"{j}.png", image_id)
            images[image_id] = direction[k] + 1.3 * rng.normal(size=DIM)
            labels.append(k)
            image_id += 1
    (root / "animals" / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "animals" / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")

    # Retrieval: a Karpathy split, every image with 2 or 3 captions near it (some nearer another).
    entries, owner, captions = [], [], []
    for i, n in enumerate(CAPTIONS_PER_IMAGE):
        image_id = 100 + i
        _save(root / "pairs" / "images" / f"{i}.png", image_id)
        images[image_id] = rng.normal(size=DIM)
        sentences = []
        for j in range(n):
            caption = f"image {i}, caption {j}"
            texts[caption] = images[image_id] + 1.6 * rng.normal(size=DIM)
            sentences.append({"raw": caption})
            owner.append(i)
            captions.append(caption)
        entries.append({"filename": f"{i}.png", "split": "test", "sentences": sentences})
    entries.append({"filename": "unused.png", "split": "train", "sentences": [{"raw": "not read"}]})
    (root / "pairs" / "karpathy.json").write_text(json.dumps({"images": entries}))

    return dict(root=str(root), images=images, texts=texts, labels=np.asarray(labels),
                owner=np.asarray(owner), captions=captions)  # fmt: skip


def _task(world, name: str, entry: dict):
    tokenizer = _Tokenizer()
    ctx = tasks.EvalContext(
        encoders=_Encoders(tokenizer, world["images"], world["texts"]),
        tokenizer=tokenizer,
        preprocess=_preprocess,
        data_dir=world["root"],
    )
    return tasks.build_task(name, entry, ctx)


def test_the_task_types_are_one_list():
    assert set(tasks.TASK_CLASSES) == set(registry.TASK_TYPES)


def test_zeroshot_counts_with_the_datasets_own_class_names_and_templates(world):
    task = _task(world, "animals", dict(type="zeroshot_classification", dataset="folder:animals"))
    assert task.templates == TEMPLATES  # templates.txt, not CLIP's 80
    assert task.data.classnames == CLASSNAMES  # classnames.txt, not the folder names
    got = task.run(None)

    # By hand: each class is the mean of its normalised prompts, normalised; each image goes to the
    # classes of highest cosine similarity.
    classes = []
    for name in CLASSNAMES:
        prompts = [_unit(world["texts"][t.format(name)]) for t in TEMPLATES]
        classes.append(_unit(np.mean(prompts, axis=0)))
    hits1, hits5 = [], []
    per_class = {k: [] for k in range(len(CLASSNAMES))}
    for image_id, label in zip(range(1, len(world["labels"]) + 1), world["labels"], strict=True):
        image = _unit(world["images"][image_id])
        scores = [float(image @ c) for c in classes]
        ranked = sorted(range(len(classes)), key=lambda k: -scores[k])
        hits1.append(ranked[0] == label)
        hits5.append(label in ranked[:5])
        per_class[label].append(ranked[0] == label)
    want = {
        "acc1": sum(hits1) / len(hits1),
        "acc5": sum(hits5) / len(hits5),
        "mean_per_class_recall": float(np.mean([np.mean(h) for h in per_class.values()])),
    }
    assert 0 < want["acc1"] < want["acc5"] < 1  # the data tells right from wrong at both k
    assert got == pytest.approx(want, abs=1e-9)

    # CLIP's 80 templates (what the task would use without templates.txt) give other numbers here.
    clip = load_templates(CLIP_TEMPLATES)
    assert not set(clip) & set(TEMPLATES)
    task.templates = clip
    assert task.run(None) != pytest.approx(want, abs=1e-9)


def test_retrieval_counts_a_hit_for_any_of_an_images_captions(world):
    entry = dict(type="retrieval", dataset="karpathy:pairs/karpathy.json", images="pairs/images",
                 split="test", recall_at=RECALL_AT)  # fmt: skip
    task = _task(world, "pairs", entry)
    assert task.data.captions == [
        [f"image {i}, caption {j}" for j in range(n)] for i, n in enumerate(CAPTIONS_PER_IMAGE)
    ]
    got = task.run(None)

    images = [_unit(world["images"][100 + i]) for i in range(len(CAPTIONS_PER_IMAGE))]
    captions = [_unit(world["texts"][c]) for c in world["captions"]]
    owner = list(world["owner"])
    sim = np.asarray([[float(i @ t) for t in captions] for i in images])  # [images, captions]
    want, first_caption_only = {}, {}
    for k in RECALL_AT:
        # Image -> text: a hit when ANY of the image's captions is among its k nearest captions.
        i2t, i2t_first = [], []
        for i in range(len(images)):
            nearest = sorted(range(len(captions)), key=lambda t: -sim[i, t])[:k]
            i2t.append(any(owner[t] == i for t in nearest))
            i2t_first.append(owner.index(i) in nearest)
        # Text -> image: a hit when the caption's one image is among its k nearest images.
        t2i = []
        for t in range(len(captions)):
            nearest = sorted(range(len(images)), key=lambda i: -sim[i, t])[:k]
            t2i.append(owner[t] in nearest)
        want[f"text_retrieval_recall@{k}"] = sum(i2t) / len(i2t)
        want[f"image_retrieval_recall@{k}"] = sum(t2i) / len(t2i)
        first_caption_only[k] = sum(i2t_first) / len(i2t_first)
    assert got == pytest.approx(want, abs=1e-9)
    # The data tells "any caption" from "the first caption", and the recalls are not trivially 0 or 1.
    assert any(first_caption_only[k] != want[f"text_retrieval_recall@{k}"] for k in RECALL_AT)
    assert 0 < want["text_retrieval_recall@1"] < 1 and 0 < want["image_retrieval_recall@1"] < 1
