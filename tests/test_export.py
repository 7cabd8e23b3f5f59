"""HuggingFace interoperability, proven against transformers itself (torch on the CPU).

Export: a trained run -> a transformers CLIP directory whose own tokenizer and
image processor, from raw strings and raw images, give our embeddings.
Import: random transformers CLIPModels (with HF's CLIP BPE tokenizer, or a
VeCLIP-style directory with only config.json + model.safetensors) give HF's
embeddings through `veclip_jax.load`, and start a training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import veclip_jax
from tests.helpers import tiny_run_config
from veclip_jax import defaults
from veclip_jax.api import LoadedCLIP
from veclip_jax.data import demo, image_ops, records
from veclip_jax.data.image_ops import EvalPreprocess, bilinear_resize
from veclip_jax.data.tokenizer import Tokenizer
from veclip_jax.hf.from_hf import params_from_hf
from veclip_jax.hf.to_hf import export_checkpoint, save_hf_directory
from veclip_jax.objectives.model import build, init_params
from veclip_jax.run.checkpoint import restore_params
from veclip_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _images(demo_data: demo.DemoData, n: int = 3) -> list:
    """Raw images of several sizes and shapes: demo JPEGs, random noise, a uint8 array."""
    reader = records.RecordReader([demo_data.eval_file])
    import io

    out: list = [Image.open(io.BytesIO(reader[i].jpeg)) for i in range(n)]
    rng = np.random.default_rng(0)
    out += [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 90), (120, 33)]
    ]
    out.append(rng.integers(0, 256, (41, 41, 3), dtype=np.uint8))
    return out


TEXTS = [
    "a red circle.",
    "An image of a large blue square at the top left and a small green cross in the center, on a white "
    "background.",
    "IMG_4821.jpg",
    "",
    "very long " * 40,
]


def _hf_embeddings(model, pixel_values, input_ids, attention_mask=None):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.as_tensor(pixel_values))
        txt = model.get_text_features(input_ids=torch.as_tensor(input_ids), attention_mask=attention_mask)
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    return (torch.nn.functional.normalize(x, dim=-1).numpy() for x in (img, txt))


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# --- export ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "hf")
    return export_checkpoint(tiny_run[0], out)


def test_export_gives_transformers_our_embeddings_from_raw_inputs(tiny_run, exported, demo_cache):
    ours = veclip_jax.load(tiny_run[0])
    images = _images(demo.ensure_demo_data(demo_cache))
    hf = transformers.CLIPModel.from_pretrained(exported).eval()
    processor = transformers.AutoProcessor.from_pretrained(exported)
    L = ours.model_config.text.context_length
    tok = processor.tokenizer(TEXTS, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    hf_img, hf_txt = _hf_embeddings(hf, pixels, tok["input_ids"], tok["attention_mask"])
    our_img, our_txt = ours.encode_image(images), ours.encode_text(TEXTS)
    assert _max_diff(hf_img, our_img) < TOL and _max_diff(hf_txt, our_txt) < TOL
    # HF's own forward with the usual call (dynamic padding) ranks the same.
    batch = processor(text=TEXTS, images=images, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**batch).logits_per_image.numpy()
    ours_logits = ours.logit_scale * our_img @ our_txt.T
    np.testing.assert_array_equal(logits.argmax(-1), ours_logits.argmax(-1))
    np.testing.assert_allclose(logits, ours_logits, atol=100 * TOL)


def test_exported_tokenizer_matches_our_pipeline(tiny_run, exported, demo_cache):
    data = demo.ensure_demo_data(demo_cache)
    ours = Tokenizer(os.path.join(tiny_run[0], "spiece.model"), 32)
    captions = [r.vecap_text or "" for r in records.RecordReader(data.train_files[:1])][:200]
    captions += [r.alt_text or "" for r in records.RecordReader(data.train_files[:1])][:200] + TEXTS
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    got = hf_tok(captions, padding="max_length", truncation=True, max_length=32, return_tensors="np")[
        "input_ids"
    ]
    np.testing.assert_array_equal(got, ours.encode_batch(captions))


def test_exported_config_pools_at_our_end_of_text(exported, tiny_run):
    cfg = json.load(open(os.path.join(exported, "config.json")))
    model = tiny_run_config("").model
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["eos_token_id"], text["pad_token_id"]) == (model.text.eos_id, model.text.pad_id) == (1, 0)
    assert text["vocab_size"] == model.text.vocab_size and text["max_position_embeddings"] == 32
    assert text["hidden_act"] == vision["hidden_act"] == "quick_gelu"
    assert text["layer_norm_eps"] == vision["layer_norm_eps"] == 1e-5
    pre = json.load(open(os.path.join(exported, "preprocessor_config.json")))
    assert pre["size"] == {"shortest_edge": 32} and pre["crop_size"] == {"height": 32, "width": 32}
    assert pre["resample"] == 3  # bicubic
    assert os.path.exists(os.path.join(exported, "model.safetensors"))


def test_export_cli_refuses_to_overwrite_without_force(tiny_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "export.py"),
        f"--checkpoint={tiny_run[0]}",
        f"--out={out}",
    ]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pass --force" in refused.stderr
    forced = subprocess.run([*cmd, "--force"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr[-2000:]
    transformers.CLIPModel.from_pretrained(str(out))


def test_export_clips_the_temperature_as_training_does(tiny_run, tmp_path):
    # A learned temperature past logit_scale_max: training multiplies by the maximum, so must HF.
    cfg = tiny_run_config("").model
    model = build(cfg)
    params = jax.jit(lambda r: init_params(model, r))(jax.random.key(1))
    params = jax.tree.map(np.asarray, __import__("flax").linen.unbox(params))
    params["logit_scale"] = np.asarray(np.log(2 * cfg.logit_scale_max), np.float32)
    t = cfg.text
    tok = Tokenizer(
        os.path.join(tiny_run[0], "spiece.model"), t.context_length, pad_id=t.pad_id, eos_id=t.eos_id
    )
    out = save_hf_directory(str(tmp_path / "hf"), params, cfg, tok)
    S = cfg.vision.image_size
    ours = LoadedCLIP(model, params, cfg, tok, EvalPreprocess(S, S), "random")
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    assert ours.logit_scale == pytest.approx(cfg.logit_scale_max)
    assert float(hf.logit_scale.detach().exp()) == pytest.approx(ours.logit_scale, rel=1e-6)
    # ... and the logits HF computes are ours.
    processor = transformers.AutoProcessor.from_pretrained(out)
    image = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    texts = ["a red circle.", "IMG_4821.jpg"]
    batch = processor(text=texts, images=[image], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**batch).logits_per_image.numpy()
    want = ours.logit_scale * ours.encode_image([image]) @ ours.encode_text(texts).T
    np.testing.assert_allclose(logits, want, atol=100 * TOL)


# --- the paper's tower sizes, at random init -----------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    ["B/16", pytest.param("L/14", marks=pytest.mark.slow), pytest.param("H/14", marks=pytest.mark.slow)],
)
def test_paper_sizes_export_exactly(size, tiny_run, tmp_path):
    cfg = defaults.model_config(size)
    model = build(cfg)
    params = jax.jit(lambda r: init_params(model, r))(jax.random.key(1))
    params = jax.tree.map(np.asarray, __import__("flax").linen.unbox(params))
    t = cfg.text
    tok = Tokenizer(
        os.path.join(tiny_run[0], "spiece.model"), t.context_length, pad_id=t.pad_id, eos_id=t.eos_id
    )
    out = save_hf_directory(str(tmp_path / "hf"), params, cfg, tok)
    S = cfg.vision.image_size
    ours = LoadedCLIP(model, params, cfg, tok, EvalPreprocess(S, S), "random", batch_size=2)
    del params
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(S, S), (S + 40, S)]
    ]
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    ids = processor.tokenizer(TEXTS[:3], padding="max_length", truncation=True, max_length=t.context_length)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    hf_img, hf_txt = _hf_embeddings(hf, pixels, ids["input_ids"])
    d_img, d_txt = (
        _max_diff(hf_img, ours.encode_image(images)),
        _max_diff(hf_txt, ours.encode_text(TEXTS[:3])),
    )
    print(f"{size}: max |HF - ours| image {d_img:.2e}, text {d_txt:.2e}")
    assert d_img < TOL and d_txt < TOL


# --- import -----------------------------------------------------------------------------------------------


def _clip_bpe_tokenizer(directory: str) -> transformers.PreTrainedTokenizerBase:
    """An OpenAI-style CLIP BPE tokenizer (vocab.json + merges.txt written here), loaded by transformers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    os.makedirs(directory, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("r", "e"), ("c", "i"), ("ci", "r"), ("e", "d</w>")]
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the end of text is the highest id, as in OpenAI's
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(directory)


def _random_hf_clip(directory: str, *, act: str, vocab: int, eos: int, pad: int, context: int = 16, **sizes):
    """A transformers CLIPModel with every weight randomised, saved with save_pretrained."""
    v = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8, hidden_act=act) | sizes.get("vision", {})  # fmt: skip
    t = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=context, hidden_act=act, eos_token_id=eos,
             pad_token_id=pad, bos_token_id=eos) | sizes.get("text", {})  # fmt: skip
    cfg = transformers.CLIPConfig(
        text_config=t, vision_config=v, projection_dim=sizes.get("projection_dim", 24)
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms and biases too, so every mapping is exercised
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize(
    "act, legacy_eos", [("quick_gelu", True), ("gelu", False)], ids=["quick_gelu-openai_eos2", "gelu"]
)
def test_import_of_a_hf_clip_gives_hf_embeddings(act, legacy_eos, tmp_path, demo_cache):
    d = str(tmp_path / "clip")
    tok = _clip_bpe_tokenizer(str(tmp_path / "bpe"))
    # OpenAI's configs say eos_token_id 2 (HF then pools at the highest id); newer ones name the real id.
    hf = _random_hf_clip(
        d, act=act, vocab=len(tok), eos=2 if legacy_eos else tok.eos_token_id, pad=tok.pad_token_id
    )
    tok.save_pretrained(d)
    # Statistics of its own (not CLIP's): the model applies them, in its jitted encoder.
    stats = dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25])
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size=32, **stats)
    image_processor.save_pretrained(d)
    ours = veclip_jax.load(d)
    assert ours.preprocess.size == 40 and ours.preprocess.crop == 32
    assert list(ours.model_config.vision.image_mean) == stats["image_mean"]
    assert list(ours.model_config.vision.image_std) == stats["image_std"]
    images = _images(demo.ensure_demo_data(demo_cache))
    ids = tok(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    pixels = image_processor(images, return_tensors="pt")["pixel_values"]
    hf_img, hf_txt = _hf_embeddings(hf, pixels, ids["input_ids"], ids["attention_mask"])
    assert _max_diff(hf_img, ours.encode_image(images)) < TOL
    assert _max_diff(hf_txt, ours.encode_text(TEXTS)) < TOL
    assert ours.logit_scale == pytest.approx(float(hf.logit_scale.detach().exp()), rel=1e-6)


def test_import_of_a_veclip_style_directory_with_a_given_tokenizer_and_veclips_preprocessing(
    tiny_run, tmp_path
):
    d = str(tmp_path / "veclip")
    hf = _random_hf_clip(d, act="quick_gelu", vocab=1024, eos=1, pad=0, context=32)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]  # as released
    with pytest.raises(FileNotFoundError, match="pass tokenizer="):
        veclip_jax.load(d)
    ours = veclip_jax.load(d, tokenizer=os.path.join(tiny_run[0], "spiece.model"))
    assert ours.preprocess.method == "tf_bilinear"
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(32, 32), (45, 70), (90, 40)]]
    # VeCLIP's pixels (float, 0-255), normalised as its evaluation does (CLIP's statistics) for HF.
    pixels = image_ops.normalize(np.stack([ours.preprocess(im) for im in images])).transpose(0, 3, 1, 2)
    ids = ours.tokenize(TEXTS)
    hf_img, hf_txt = _hf_embeddings(hf, pixels, ids, torch.as_tensor((ids != 0).astype(np.int64)))
    assert _max_diff(hf_img, ours.encode_image(images)) < TOL
    assert _max_diff(hf_txt, ours.encode_text(TEXTS)) < TOL


@pytest.mark.parametrize(
    "hw, out", [((37, 53), (20, 29)), ((20, 30), (64, 96)), ((64, 64), (17, 17)), ((375, 500), (224, 299))]
)
def test_tf_bilinear_resize_matches_torch_interpolate(hw, out):
    """Same sampling rule; float32 coordinates round differently by an ulp here and there, which on noise
    (neighbours up to 255 apart) moves a value by up to ~1e-2 of 255 (1.5e-4 after normalisation)."""
    x = np.random.default_rng(2).uniform(0, 255, (*hw, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.as_tensor(x).permute(2, 0, 1)[None],
        size=out,
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )[0].permute(1, 2, 0)
    np.testing.assert_allclose(bilinear_resize(x, *out), want.numpy(), atol=1e-2)


def test_veclip_preprocessing_resizes_the_shorter_side_and_crops_the_centre():
    p = EvalPreprocess(224, 224, "tf_bilinear")
    image = np.zeros((375, 500, 3), np.uint8)
    image[:, 250:] = 255  # right half white: the centre crop of the 224 x 299 resize keeps 112 + ... columns
    out = p(image)
    assert out.shape == (224, 224, 3)
    white = out[0, :, 0] > 0
    # Resized width 299 (round(224 * 500 / 375)), crop offset (299 - 224) // 2 = 37: white from 149.5 - 37.
    assert white[:112].sum() == 0 and white[114:].all()


def test_training_starts_from_a_hf_directory(tmp_path, demo_cache):
    d = str(tmp_path / "clip")
    # configs/tiny.py's sizes
    _random_hf_clip(
        d, act="quick_gelu", vocab=1024, eos=1, pad=0, context=32, projection_dim=32,
        vision=dict(hidden_size=64, intermediate_size=256), text=dict(intermediate_size=256),
    )  # fmt: skip
    config = tiny_run_config(demo_cache, total_steps=1, eval_every=0, init_from=d)
    config.optim.update(learning_rate=1e-12, warmup_steps=0)
    result = loop.train(config, str(tmp_path / "run"))
    got, _ = restore_params(result.checkpoint)
    from veclip_jax.hf.from_hf import load_hf_state_dict

    want = params_from_hf(load_hf_state_dict(d), jax.tree.map(np.asarray, got))
    diffs = jax.tree.map(lambda a, b: _max_diff(a, b), got, want)
    assert max(jax.tree.leaves(diffs)) < 1e-6

    config.model.embed_dim = 48
    with pytest.raises(loop.ConfigError, match=r"config\.init_from: config\.model\.embed_dim=48"):
        loop.train(config, str(tmp_path / "other"))


def test_a_clip_with_its_bpe_tokenizer_fine_tunes_and_exports(tmp_path, demo_cache):
    """Import (weights, BPE tokenizer) -> train on our data with that tokenizer -> export -> transformers."""
    d = str(tmp_path / "clip")
    tok = _clip_bpe_tokenizer(str(tmp_path / "bpe"))
    # configs/tiny.py's sizes
    _random_hf_clip(
        d, act="quick_gelu", vocab=1024, eos=tok.eos_token_id, pad=tok.pad_token_id, context=32,
        projection_dim=32, vision=dict(hidden_size=64, intermediate_size=256),
        text=dict(intermediate_size=256),
    )  # fmt: skip
    tok.save_pretrained(d)
    config = tiny_run_config(demo_cache, total_steps=3, eval_every=3, init_from=d)
    config.data.tokenizer = d
    config.model.text.update(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    workdir = str(tmp_path / "run")
    result = loop.train(config, workdir)
    assert result.eval  # evaluated with the BPE tokenizer's prompts
    assert os.path.isdir(os.path.join(workdir, "tokenizer"))  # the workdir keeps it

    out = export_checkpoint(workdir, str(tmp_path / "exported"))
    ours = veclip_jax.load(workdir)
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    ids = processor.tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=32, return_tensors="pt"
    )
    np.testing.assert_array_equal(ids["input_ids"].numpy(), ours.tokenize(TEXTS))
    images = _images(demo.ensure_demo_data(demo_cache))
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    hf_img, hf_txt = _hf_embeddings(hf, pixels, ids["input_ids"], ids["attention_mask"])
    assert _max_diff(hf_img, ours.encode_image(images)) < TOL
    assert _max_diff(hf_txt, ours.encode_text(TEXTS)) < TOL
