"""FILIP's token-wise evaluation (veclip_jax/eval/tokenwise.py) against numpy: the token encoders are
the training path's towers and heads, the zero-shot class token sets and logits and the retrieval
similarities and recalls equal a direct computation (padding masked, prompts averaged over the
positions they reach, several chunks and padded blocks), and the scoring follows the objective: a
FILIP `:local` run is evaluated token-wise, in training and by launch/eval.py's code, a CLIP run pooled."""

from __future__ import annotations

import importlib
import json
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from veclip_jax import defaults
from veclip_jax.data.image_ops import EvalPreprocess
from veclip_jax.data.tokenizer import load_tokenizer
from veclip_jax.eval import tasks
from veclip_jax.eval.datasets import load_image
from veclip_jax.eval.retrieval import tokenwise_retrieval_recall
from veclip_jax.eval.tasks import EvalContext, Retrieval, ZeroShotClassification
from veclip_jax.eval.tokenwise import TokenScorer, class_token_sets
from veclip_jax.eval.zeroshot import classification_metrics, prompts, top_k
from veclip_jax.objectives import make_objective
from veclip_jax.objectives.filip import late_interaction_logits
from veclip_jax.objectives.model import ObjectiveModel, build, init_params
from veclip_jax.parallel.mesh import make_mesh, replicated
from veclip_jax.recipes.declip import tiny_objective
from veclip_jax.run.inference import POOLED, TOKENWISE, Encoders, late_interaction, scoring_for

N_IMAGES = 11  # not a multiple of the batch (8): the last batch is padded
# Templates of different lengths: the class token sets average each position over the prompts reaching it.
TEMPLATES = ("{}", "a {} shape.", "a photo of a small {} object on a plain background.")


def _model(objective: str):
    c = defaults.get_config("tiny")
    tiny_objective(c, objective)
    return build(c.model, make_objective(c.objective))


@pytest.fixture(scope="module")
def filip(demo_cache):
    """A tiny FILIP model with random parameters, its encoders (batch 8) on 8 devices and on 2 (4
    images per device), the demo data."""
    from veclip_jax.data.demo import ensure_demo_data

    demo = ensure_demo_data(demo_cache)
    model = _model("filip")
    params = nn.unbox(init_params(model, jax.random.key(3)))
    mesh = make_mesh(dict(data=-1, fsdp=1, tensor=1))
    encoders = Encoders(model, mesh, jax.tree.map(lambda _: replicated(mesh), params), 8)
    mesh2 = make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:2])
    encoders2 = Encoders(model, mesh2, jax.tree.map(lambda _: replicated(mesh2), params), 8)
    tok = load_tokenizer(demo.tokenizer, model.towers.context_length, pad_id=0, eos_id=model.towers.eos_id)
    size = model.towers.image_size
    ctx = EvalContext(encoders, tok, EvalPreprocess(size, size), demo_files=[demo.eval_file])
    return types.SimpleNamespace(model=model, params=params, mesh=mesh, mesh2=mesh2, encoders=encoders,
                                 encoders2=encoders2, ctx=ctx)  # fmt: skip


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_tokens(f, images: np.ndarray, rows: np.ndarray):
    """(image tokens, text tokens, text validity) through the training path (the model's outputs and the
    objective's heads, unjitted), normalised per token in numpy (float64)."""
    n = max(len(images), len(rows))
    views = np.zeros((n, 1, *images.shape[1:]), images.dtype)  # uint8 pixels: the model normalises
    views[: len(images), 0] = images
    tokens = np.zeros((n, rows.shape[1]), np.int32)
    tokens[: len(rows)] = rows
    batch = {"views": views, "tokens": tokens}
    out = f.model.apply({"params": f.params}, batch, method=ObjectiveModel.outputs)
    heads = out["objective"]
    return (
        _unit(heads["image_tokens"])[: len(images)],
        _unit(heads["text_tokens"])[: len(rows)],
        np.asarray(out["text_valid"])[: len(rows)],
    )


def _late(q, q_valid, k, k_valid) -> np.ndarray:
    """Mean over the query's valid tokens of the max over the key's valid tokens, written out in numpy."""
    out = np.zeros((len(q), len(k)))
    for a in range(len(q)):
        for c in range(len(k)):
            sims = q[a][q_valid[a]] @ k[c][k_valid[c]].T  # [valid query tokens, valid key tokens]
            out[a, c] = sims.max(axis=1).mean()
    return out


def _images(f, task, n: int) -> np.ndarray:
    return np.stack([f.ctx.preprocess(load_image(task.data.source[i]["image"])) for i in range(n)])


def _batched(fn, images: np.ndarray, b: int = 8) -> np.ndarray:
    """fn(images [b], tags [b, 2]) -> (out [b, ...], tags) over padded batches, the real rows."""
    outs = []
    for s in range(0, len(images), b):
        chunk = images[s : s + b]
        pad = np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)
        outs.append(fn(np.concatenate([chunk, pad]), np.zeros((b, 2), np.int32))[0][: len(chunk)])
    return np.concatenate(outs)


def test_the_scoring_follows_the_objective():
    assert scoring_for("filip") == TOKENWISE
    for name in ("clip", "siglip", "slip", "declip", "defilip"):
        assert scoring_for(name) == POOLED, name
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    for objective, expected in (("filip", TOKENWISE), ("defilip", POOLED), ("clip", POOLED)):
        model = _model(objective)
        assert Encoders(model, mesh, None, 8).scoring == expected, objective
    assert tasks.LinearProbe.scoring.fget(None) == POOLED  # a probe fits the pooled features, always


def test_the_token_encoders_are_the_training_towers_and_heads(filip):
    f = filip
    rng = np.random.default_rng(0)
    s = f.model.towers.image_size
    images = rng.integers(0, 256, size=(N_IMAGES, s, s, 3), dtype=np.uint8)
    rows = f.ctx.tokenizer.encode_batch(["a red circle.", "a small blue square on a grey background", "x"])
    ref_img, ref_txt, ref_valid = _reference_tokens(f, images, rows)
    got = _batched(lambda im, tg: f.encoders.image_token_batch(f.params, im, tg), images)
    np.testing.assert_allclose(got, ref_img, atol=1e-5)
    txt, valid = f.encoders.text_tokens(f.params, rows)
    length = ref_valid.sum(axis=1).max()  # positions after the longest caption are dropped
    assert txt.shape == (3, length, f.encoders.token_shape[1])
    np.testing.assert_array_equal(valid, ref_valid[:, :length])
    np.testing.assert_allclose(txt[valid], ref_txt[:, :length][valid], atol=1e-5)
    assert not txt[~valid].any()  # padding: zero vectors


def test_tokenwise_zeroshot_equals_numpy(filip):
    f = filip
    entry = dict(type="zeroshot_classification", dataset="demo", label_field="color", templates=TEMPLATES,
                 max_examples=N_IMAGES)  # fmt: skip
    task = ZeroShotClassification("demo_color", entry, f.ctx)
    assert task.scoring == TOKENWISE
    names, t = task.data.classnames, len(TEMPLATES)
    images = _images(f, task, N_IMAGES)
    rows = f.ctx.tokenizer.encode_batch(prompts(names, TEMPLATES))
    img, txt, valid = _reference_tokens(f, images, rows)
    # Class token sets: per position, the mean over the prompts valid there, normalised again.
    txt, valid = txt.reshape(len(names), t, *txt.shape[1:]), valid.reshape(len(names), t, -1)
    count = valid.sum(axis=1)
    assert ((count > 0) & (count < t)).any()  # some positions are reached by some prompts only
    mean = np.where(valid[..., None], txt, 0.0).sum(axis=1) / np.maximum(count, 1)[..., None]
    ref_valid = count > 0
    ref_sets = np.where(ref_valid[..., None], _unit(np.where(ref_valid[..., None], mean, 1.0)), 0.0)
    sets, set_valid = task.class_token_sets(f.params)
    length = sets.shape[1]
    assert not ref_valid[:, length:].any()
    np.testing.assert_array_equal(set_valid, ref_valid[:, :length])
    np.testing.assert_allclose(sets, ref_sets[:, :length], atol=1e-5)
    # Logits: image -> class late interaction, padding out of the max; scored in chunks of 2 classes
    # (the last one padded) with 1 and 4 images per device, then the same with two more positions,
    # invalid and holding garbage.
    ref = _late(img, np.ones(img.shape[:2], bool), ref_sets, ref_valid)
    assert len(names) > 2
    for extra, enc, per_device in ((0, f.encoders, 1), (0, f.encoders2, 4), (2, f.encoders2, 4)):
        s = np.concatenate([sets, np.full((len(names), extra, sets.shape[2]), 5.0, np.float32)], axis=1)
        v = np.concatenate([set_valid, np.zeros((len(names), extra), bool)], axis=1)
        keys = enc.put_classes(s, v, budget=2 * per_device * img.shape[1] * (length + extra))
        assert keys.chunk == 2 and keys.tokens.shape[0] == len(names) + len(names) % 2
        logits = _batched(lambda im, tg, k=keys, e=enc: e.zeroshot_batch(f.params, im, tg, k), images)
        np.testing.assert_allclose(logits, ref, atol=1e-5)
    # The task: its metrics are those of the reference logits.
    labels = task.data.labels[:N_IMAGES]
    expected = classification_metrics(top_k(ref, 5), labels, len(names))
    assert task.run(f.params) == pytest.approx(expected)


def test_class_token_sets_average_each_position_over_the_prompts_reaching_it():
    """Garbage at the padding, prompts of one class split over batches: numpy's masked mean."""
    rng = np.random.default_rng(2)
    classes, t, length, dim = 4, 3, 6, 5
    tok = _unit(rng.normal(size=(classes * t, length, dim)))
    valid = np.arange(length)[None, :] < rng.integers(1, length - 1, size=classes * t)[:, None]
    tok[~valid] = rng.normal(size=(int((~valid).sum()), dim)) * 7  # padding: not unit, not zero
    batches = [(s, tok[s : s + 5], valid[s : s + 5]) for s in range(0, classes * t, 5)]
    sets, set_valid = class_token_sets(batches, classes, t)
    for c in range(classes):
        for pos in range(length):
            reach = valid[c * t : (c + 1) * t, pos]
            assert set_valid[c, pos] == reach.any()
            if reach.any():
                mean = tok[c * t : (c + 1) * t, pos][reach].mean(axis=0)
                np.testing.assert_allclose(sets[c, pos], mean / np.linalg.norm(mean), atol=1e-6)
            else:
                assert not sets[c, pos].any()


def _ranks_reference(i2t: np.ndarray, t2i: np.ndarray, owner: np.ndarray, ks) -> dict:
    """recall@k from full similarity matrices, written out."""
    t_hits = {k: [] for k in ks}
    for t, own in enumerate(owner):
        rank = np.sum(t2i[t] > t2i[t, own])
        for k in ks:
            t_hits[k].append(rank < k)
    i_hits = {k: [] for k in ks}
    for i in range(i2t.shape[0]):
        mine = np.flatnonzero(owner == i)
        if len(mine):
            rank = np.sum(i2t[i] > i2t[i, mine].max())
            for k in ks:
                i_hits[k].append(rank < k)
    out = {f"image_retrieval_recall@{k}": float(np.mean(t_hits[k])) for k in ks}
    return out | {f"text_retrieval_recall@{k}": float(np.mean(i_hits[k])) for k in ks}


def test_tokenwise_retrieval_equals_numpy(filip):
    f = filip
    ks = (1, 2, 5)
    entry = dict(type="retrieval", dataset="demo", caption_field="vecap_text", recall_at=ks,
                 max_examples=N_IMAGES)  # fmt: skip
    task = Retrieval("demo_retrieval", entry, f.ctx)
    assert task.scoring == TOKENWISE
    captions = [c for cs in task.data.captions[:N_IMAGES] for c in cs]
    owner = np.repeat(np.arange(N_IMAGES), [len(cs) for cs in task.data.captions[:N_IMAGES]])
    img, txt, valid = _reference_tokens(f, _images(f, task, N_IMAGES), f.ctx.tokenizer.encode_batch(captions))
    every = np.ones(img.shape[:2], bool)
    i2t, t2i = _late(img, every, txt, valid), _late(txt, valid, img, every)
    # The training loss's own definition (filip.py, no token selection) gives the same matrices.
    train_i2t, train_t2i = late_interaction_logits(img, np.where(valid[..., None], txt, 0), valid, img,
                                                   np.where(valid[..., None], txt, 0), valid)  # fmt: skip
    np.testing.assert_allclose(train_i2t, i2t, atol=1e-5)
    np.testing.assert_allclose(train_t2i, t2i, atol=1e-5)
    assert task.run(f.params) == pytest.approx(_ranks_reference(i2t, t2i, owner, ks))


def test_tokenwise_retrieval_masks_padding_in_chunks_and_blocks(filip):
    """Random unit tokens, garbage at the texts' padding, several captions per image (one image has
    none), 3-row query blocks and 2-key chunks over 2 devices (rows padded): numpy's recalls."""
    rng = np.random.default_rng(1)
    n_img, n_txt, patches, length, dim = 7, 13, 5, 6, 4
    img = _unit(rng.normal(size=(n_img, patches, dim)))
    txt = _unit(rng.normal(size=(n_txt, length, dim)))
    valid = np.arange(length)[None, :] < rng.integers(1, length + 1, size=n_txt)[:, None]
    # 1 to 3 captions for each image but the last (a target only)
    owner = np.sort(np.r_[np.arange(n_img - 1), rng.integers(0, n_img - 1, size=n_txt - n_img + 1)])
    every = np.ones((n_img, patches), bool)
    i2t, t2i = _late(img, every, txt, valid), _late(txt, valid, img, every)
    garbage = np.where(valid[..., None], txt, 3.0)
    scorer = TokenScorer(filip.mesh2, block=3, budget=3 * patches * length * 2)
    keys = scorer.keys(garbage, valid, query_tokens=patches)
    assert keys.chunk == 2 and keys.tokens.shape[0] == 16  # 4 chunks of 2 per device
    np.testing.assert_allclose(scorer.scores(img, every, keys), i2t, atol=1e-5)
    keys = scorer.keys(img, every, query_tokens=length)
    assert keys.chunk == 2 and keys.tokens.shape[0] == 8
    np.testing.assert_allclose(scorer.scores(garbage, valid, keys), t2i, atol=1e-5)
    ks = (1, 2, 3)
    got = tokenwise_retrieval_recall(scorer, img, garbage, valid, owner, ks, chunk=4)
    assert got == pytest.approx(_ranks_reference(i2t, t2i, owner, ks))
    # The jitted block itself: a key without a valid token scores -inf, a query without one 0.
    none = np.zeros((1, length), bool)
    assert np.isneginf(np.asarray(late_interaction(img[:1], every[:1], txt[:1], none)))[0, 0]
    assert np.asarray(late_interaction(txt[:1], none, img[:1], every[:1]))[0, 0] == 0


def _local_run(objective: str, demo_cache: str, workdir: str):
    from veclip_jax.train import loop

    config = importlib.import_module(f"configs.yfcc15m_{objective}_vitb32").get_config("local")
    config.data.cache_dir = demo_cache
    config.update(dict(total_steps=2, eval_every=2))
    config.evals = {k: config.evals[k] for k in ("demo_color", "demo_retrieval")}
    return loop.train(config, workdir)


@pytest.mark.parametrize(
    "objective, scoring",
    # A CLIP run's pooled scoring is what every other evaluation test runs: the CLIP row is slow.
    [("filip", TOKENWISE), pytest.param("clip", POOLED, marks=pytest.mark.slow)],
)
def test_a_filip_local_run_is_evaluated_tokenwise_and_a_clip_run_pooled(objective, scoring, demo_cache,
                                                                         tmp_path):  # fmt: skip
    import veclip_jax
    from veclip_jax.data.demo import ensure_demo_data
    from veclip_jax.eval.run import evaluate, run_tasks
    from veclip_jax.run.workdir import read_jsonl

    workdir = str(tmp_path / objective)
    trained = _local_run(objective, demo_cache, workdir)
    logged = read_jsonl(f"{workdir}/eval.jsonl")
    out = evaluate(workdir, progress=False)
    assert out.scoring == {"demo_color": scoring, "demo_retrieval": scoring}
    for path in out.files:
        with open(path) as fh:
            assert json.load(fh)["scoring"] == scoring
    # Training evaluated the same way: the same metric names and numbers as launch/eval.py's code.
    flat = {f"{t}/{k}": v for t, m in out.results.items() for k, v in m.items()}
    assert set(flat) == set(trained.eval)
    assert flat == pytest.approx(trained.eval)
    assert logged[-1] == pytest.approx({"step": 2} | flat)
    if objective == "filip":  # scored with the pooled embeddings instead, the numbers differ
        loaded = veclip_jax.load(workdir)
        with open(f"{workdir}/config.json") as fh:
            entries = {k: dict(v) for k, v in json.load(fh)["evals"].items()}
        pooled, _ = run_tasks(
            loaded.model, jax.device_get(loaded.params), loaded.tokenizer, loaded.preprocess, entries,
            demo_files=[ensure_demo_data(demo_cache).eval_file], scoring=POOLED,
        )  # fmt: skip
        assert pooled != out.results
