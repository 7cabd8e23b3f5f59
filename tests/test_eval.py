"""Evaluation math against direct numpy, the eval preprocessing, and the evaluator's wiring."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from veclip_jax.data import image_ops
from veclip_jax.eval.evaluator import Evaluator, LabelledSet
from veclip_jax.eval.retrieval import retrieval_recall
from veclip_jax.eval.zeroshot import class_embeddings, prompts, topk_accuracy


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_retrieval_recall_matches_a_direct_count():
    rng = np.random.default_rng(0)
    img = _unit(rng.normal(size=(20, 8)))
    owner = np.repeat(np.arange(20), 3)[:50]  # up to 3 captions per image; images 16.. have none or fewer
    txt = _unit(img[owner] + 0.8 * rng.normal(size=(50, 8)))
    got = retrieval_recall(img, txt, owner, ks=(1, 5))
    sim = img @ txt.T
    for k in (1, 5):
        i2t = [
            np.isin(np.argsort(-sim[i])[:k], np.flatnonzero(owner == i)).any()
            for i in range(20)
            if (owner == i).any()
        ]
        t2i = [owner[t] in np.argsort(-sim[:, t])[:k] for t in range(50)]
        assert got[f"i2t_R@{k}"] == pytest.approx(np.mean(i2t))
        assert got[f"t2i_R@{k}"] == pytest.approx(np.mean(t2i))
    perfect = retrieval_recall(img, img, np.arange(20), ks=(1,))
    assert perfect == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}


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
    images = np.stack([want[1], want[0], want[1]])
    assert topk_accuracy(images, got, np.array([1, 0, 0]), k=1) == pytest.approx(2 / 3)
    assert topk_accuracy(images, got, np.array([1, 0, 0]), k=2) == 1.0


@pytest.mark.parametrize("size_wh", [(64, 48), (48, 64), (32, 32), (100, 37)])
def test_eval_resize_center_crop_keeps_the_centre(size_wh):
    w, h = size_wh
    arr = np.zeros((h, w, 3), np.uint8)
    r = min(w, h) // 8
    arr[h // 2 - r : h // 2 + r, w // 2 - r : w // 2 + r] = 255  # a white square in the middle
    out = image_ops.resize_center_crop(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[7:9, 7:9].mean() > 200 and out[:3].mean() < 20  # still central, edges still dark


def test_decode_eval_image_refuses_garbage():
    with pytest.raises(image_ops.ImageDecodeError):
        image_ops.decode_eval_image(b"not an image", 16)


class _ColourEncoder:
    """Embeds an image by its mean colour channel and a text by the colour word it contains."""

    words = ("red", "green", "blue")

    def images(self, params, images):
        return np.eye(3)[np.argmax(images.reshape(len(images), -1, 3).mean(axis=1), axis=1)]

    def texts(self, params, tokens):
        return np.eye(3)[tokens[:, 0]]


class _WordTokenizer:
    def encode_batch(self, texts):
        return np.asarray([[next(i for i, w in enumerate(_ColourEncoder.words) if w in t)] for t in texts])


def test_evaluator_reports_zero_shot_and_retrieval_per_attribute():
    colours = ["red", "green", "blue", "green"]
    images = np.stack(
        [np.full((4, 4, 3), 255 * np.eye(3)[_ColourEncoder.words.index(c)], np.uint8) for c in colours]
    )
    data = LabelledSet(
        images=images,
        labels={"color": colours, "shape": ["circle", None, "square", "circle"]},
        captions=[f"a {c} thing" for c in colours[:3]] + [""],
        skipped=0,
    )
    ev = Evaluator(_ColourEncoder(), data, _WordTokenizer(), {"color": ("a {} shape.",)}, recall_at=(1,))
    out = ev(params=None)
    assert out["zeroshot/color_top1"] == 1.0
    assert "zeroshot/shape_top1" not in out  # no templates: not classified
    assert out["retrieval/i2t_R@1"] == 1.0 and out["retrieval/t2i_R@1"] == 1.0  # 3 captioned images
