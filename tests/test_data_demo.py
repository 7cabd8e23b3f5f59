"""The embedded demo data: deterministic, cached, web-like AltTexts, full VeCaps, labelled eval split."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from veclip_jax.data import captions, demo, records
from veclip_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> demo.DemoData:
    return demo.ensure_demo_data(str(tmp_path_factory.mktemp("cache")), num_train=600, num_eval=60)


@pytest.fixture(scope="module")
def train(data) -> list[records.Record]:
    return list(records.RecordReader(data.train_files))


def _words(text: str | None) -> set[str]:
    return set(re.findall(r"[a-z]+", (text or "").lower()))


def test_generation_is_deterministic(tmp_path):
    a = demo.ensure_demo_data(str(tmp_path / "a"), num_train=40, num_eval=8, num_shards=2)
    b = demo.ensure_demo_data(str(tmp_path / "b"), num_train=40, num_eval=8, num_shards=2)
    for fa, fb in [*zip(a.train_files, b.train_files, strict=True), (a.eval_file, b.eval_file)]:
        assert list(records.RecordReader(fa)) == list(records.RecordReader(fb))
    with open(a.tokenizer, "rb") as fa, open(b.tokenizer, "rb") as fb:
        assert fa.read() == fb.read()


def test_cached_data_is_reused(data):
    manifest = os.path.join(data.root, "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    again = demo.ensure_demo_data(os.path.dirname(data.root), num_train=600, num_eval=60)
    assert again == data and os.stat(manifest).st_mtime_ns == before


def test_images_are_jpegs_of_the_requested_size_with_varied_content(data, train):
    images = [np.asarray(Image.open(io.BytesIO(r.jpeg))) for r in train[:50]]
    assert all(im.shape == (64, 64, 3) for im in images)
    corners = {tuple(im[1, 1] // 64) for im in images}  # background colours differ
    assert len(corners) >= 3


def test_vecap_describes_every_object_and_the_background(train):
    colors, shapes = set(demo.COLORS), set(demo.SHAPES)
    counts = []
    for r in train:
        if r.vecap_text is None:
            continue
        words = _words(r.vecap_text)
        assert words & set(demo.BACKGROUNDS)
        n_shapes = sum(len(re.findall(rf"\b{s}\b", r.vecap_text)) for s in shapes)
        assert n_shapes >= 1 and words & colors and words & set(demo.SIZES)
        counts.append(n_shapes)
    # 1 to 3 objects per training image, in proportions near 0.5 / 0.3 / 0.2.
    freq = np.bincount(counts, minlength=4)[1:] / len(counts)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.07)


def test_alt_texts_are_short_partial_noisy_and_sometimes_unrelated_or_missing(train):
    n = len(train)
    alts = [r.alt_text for r in train]
    missing = sum(a is None for a in alts) / n
    assert 0.05 < missing < 0.16
    present = [a for a in alts if a is not None]
    visual = set(demo.COLORS) | set(demo.SHAPES)
    unrelated = sum(not (_words(a) & visual) for a in present) / len(present)
    assert 0.2 < unrelated < 0.45
    lengths = [len(captions.clean_caption(a).split()) for a in present]
    vecap_lengths = [len(r.vecap_text.split()) for r in train if r.vecap_text]
    assert np.mean(lengths) < 0.5 * np.mean(vecap_lengths)
    assert any(captions.clean_caption(a) != a for a in present)  # some need cleaning
    # Never both missing: the demo data trains without skipped records.
    assert all(r.alt_text or r.vecap_text for r in train)
    assert any(r.vecap_text is None for r in train)


def test_eval_split_has_one_labelled_object_per_image(data):
    recs = list(records.RecordReader(data.eval_file))
    assert len(recs) == 60
    for r in recs:
        assert set(r.labels) == set(data.attributes)
        for attr, value in r.labels.items():
            assert value in data.attributes[attr]
        lb = r.labels
        assert f"{lb['size']} {lb['color']} {lb['shape']}" in r.vecap_text
        assert lb["background"] in r.vecap_text
    assert len({r.labels["color"] for r in recs}) == len(demo.COLORS)
    assert data.templates[0].format(**recs[0].labels).startswith("a ")


def test_demo_tokenizer_fits_the_tiny_model_and_knows_the_captions(data, train):
    sp = spm.SentencePieceProcessor(model_file=data.tokenizer)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    tok = Tokenizer(data.tokenizer, 32)
    assert 100 < tok.vocab_size <= 1024
    rows = tok.encode_batch([captions.clean_caption(r.vecap_text) for r in train if r.vecap_text])
    assert (rows != tok.unk_id).all()
