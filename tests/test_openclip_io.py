"""open_clip interop, proven against open_clip's own model code (tests/openclip_ref.py: a subprocess).

Out: our directories (a trained tiny run through `launch/export.py --format=open_clip`, T5
vocabulary; random ViT and ResNet towers with CLIP's BPE, SigLIP's bias, GELU and another LayerNorm
eps) load in open_clip with `create_model_and_transforms("local-dir:DIR")` / `get_tokenizer`, which
give our token ids, preprocessing and embeddings. In: tiny open_clip models (ViT and ModifiedResNet,
random weights and BatchNorm statistics) saved by open_clip's side load here (local-dir, a bare
`.bin` with a model name) with open_clip's embeddings; the full RN50 / ViT-B-32 state dicts (torch's
meta device: names and shapes only) fit our towers of open_clip's packaged configs. CLIP_benchmark
evaluates an exported directory through its `open_clip` model type.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import torch

import veclip_jax
from tests.openclip_ref import available, run_reference
from veclip_jax import defaults
from veclip_jax.api import LoadedCLIP
from veclip_jax.data import image_ops
from veclip_jax.data.image_ops import EvalPreprocess
from veclip_jax.data.tokenizer import load_tokenizer
from veclip_jax.errors import UserError
from veclip_jax.objectives import make_objective
from veclip_jax.objectives.model import abstract_model_state, abstract_params, build, init_variables
from veclip_jax.openclip import load as oc_load
from veclip_jax.openclip.config import OpenClipError, model_config_from_open_clip, packaged_model_cfg
from veclip_jax.openclip.export import save_open_clip_directory
from veclip_jax.openclip.weights import params_from_open_clip, read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
TEXTS = [
    "a red circle.",
    "An image of a large blue square at the top left and a small green cross in the center.",
    "IMG_4821.jpg",
    "",
    "very long " * 40,
]
RAW_SIZES = [(50, 90), (120, 33), (64, 64), (41, 41)]


def _need_reference() -> None:
    if why := available():
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _tiny(kind: str, *, bpe: bool, **model) -> object:
    cfg = defaults.model_config("tiny")
    if kind == "resnet":
        cfg.vision.update(type="resnet", resnet_layers=(1, 2, 1, 1), width=16, heads=8, image_size=64)
    if bpe:
        cfg.text.update(vocab_size=49408, eos_id=49407, pad_id=0)
    cfg.update(model)
    return cfg


def _random(cfg, objective: str = "clip", seed: int = 0):
    """(model, numpy params, model state) with every value perturbed: no zero-initialised BN scale,
    no unit running variance, no zero bias hides a transposed or misplaced tensor."""
    c = defaults.get_config()
    c.objective.name = objective
    model = build(cfg, make_objective(c.objective))
    params, state = jax.jit(lambda r: init_variables(model, r))(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    noise = lambda x, s: np.asarray(x, np.float32) + s * rng.normal(size=np.shape(x)).astype(np.float32)
    params = jax.tree.map(lambda x: noise(x, 0.05), flax.linen.unbox(params))
    state = jax.tree.map(lambda x: np.abs(noise(x, 0.3)) + 0.1, state)
    return model, params, state


def _ours(model, params, state, cfg, tok) -> LoadedCLIP:
    S = cfg.vision.image_size
    return LoadedCLIP(model, params, cfg, tok, EvalPreprocess(S, S), "random", state, batch_size=8)


def _pixels(size: int, n: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 pixels: what our encoders take (the model normalises them, in its jitted encoder)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _normalised(pixels: np.ndarray, model_cfg=None) -> np.ndarray:
    """What open_clip's model takes: the pixels normalised on the host with the model's statistics."""
    v = model_cfg.vision if model_cfg is not None else defaults.model_config("tiny").vision
    return image_ops.normalize(pixels, v.image_mean, v.image_std)


def _raw(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in RAW_SIZES]


# --- what runs in open_clip's process ---------------------------------------------------------------

# Each export: open_clip's model, transform and tokenizer from the directory alone; embeddings of our
# preprocessed pixels and of its own token ids; its preprocessing of raw images; its logits.
EXPORTED = """
import json
from PIL import Image
texts = list(inputs["texts"])
for name in json.loads(str(inputs["exports"])):
    d = str(inputs[name + "_dir"])
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
    model.eval()
    ids = open_clip.get_tokenizer("local-dir:" + d)(texts)
    pix = torch.from_numpy(inputs[name + "_pixels"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        img = model.encode_image(pix, normalize=True)
        txt = model.encode_text(ids, normalize=True)
        logits, _ = model.get_logits(pix, ids)
    outputs.update({name + "_ids": ids.numpy(), name + "_img": img.numpy(), name + "_txt": txt.numpy(),
                    name + "_logits": logits.numpy()})
    raw = [Image.fromarray(inputs[f"raw{i}"]) for i in range(int(inputs["n_raw"]))]
    outputs[name + "_pre"] = torch.stack([preprocess(im) for im in raw]).permute(0, 2, 3, 1).numpy()
"""

# Tiny open_clip models, random weights and BatchNorm statistics, saved as open_clip users save them:
# a local-dir (config + safetensors) and a bare torch .bin.
CREATED = """
import json, safetensors.torch
from open_clip.model import CLIP
torch.manual_seed(0)
for name, cfg in json.loads(str(inputs["created"])).items():
    model = CLIP(**cfg).eval()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
                if key.endswith("running_var"):
                    t.abs_().add_(0.1)
    d = str(inputs[name + "_dir"])
    json.dump({"model_cfg": cfg, "preprocess_cfg": {"interpolation": "bilinear"}},
              open(d + "/open_clip_config.json", "w"))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(sd, d + "/open_clip_model.safetensors")
    torch.save(sd, d + ".bin")
    ids = open_clip.get_tokenizer("local-dir:" + d)(list(inputs["texts"]))
    pix = torch.from_numpy(inputs[name + "_pixels"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        outputs[name + "_img"] = model.encode_image(pix, normalize=True).numpy()
        outputs[name + "_txt"] = model.encode_text(ids, normalize=True).numpy()
    outputs[name + "_ids"] = ids.numpy()
# The full-size models on torch's meta device: their state dicts' names and shapes, no memory.
for name in ("RN50-quickgelu", "ViT-B-32"):
    with torch.device("meta"):
        model = CLIP(**open_clip.get_model_config(name))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    outputs["shapes_" + name] = np.array(json.dumps(shapes))
"""

_TEXT_CFG = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2)
TINY_OPEN_CLIP = {
    "oc_vit": dict(embed_dim=24, quick_gelu=True, text_cfg=_TEXT_CFG,
                   vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16)),
    "oc_rn": dict(embed_dim=24, text_cfg=_TEXT_CFG,
                  vision_cfg=dict(image_size=64, layers=[1, 2, 1, 1], width=16)),
}  # fmt: skip


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    """name -> (our LoadedCLIP, its export directory): the tiny run through the CLI (T5), random ViT
    (CLIP's BPE, SigLIP, erf GELU, LayerNorm eps 1e-6) and ResNet (DeCLIP's 49,409-id BPE) towers."""
    tmp = tmp_path_factory.mktemp("oc_export")
    out = {}
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "export.py"), f"--checkpoint={tiny_run[0]}",
         f"--out={tmp / 'run_t5'}", "--format=open_clip"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out["run_t5"] = (veclip_jax.load(tiny_run[0], batch_size=8), str(tmp / "run_t5"))
    for name, cfg, objective in [
        ("vit_bpe", _tiny("vit", bpe=True, act="gelu", layer_norm_eps=1e-6), "siglip"),
        ("rn_bpe", _tiny("resnet", bpe=True).copy_and_resolve_references(), "clip"),
    ]:
        if name == "rn_bpe":
            cfg.text.vocab_size = 49409  # DeCLIP's mask token after CLIP's ids
        model, params, state = _random(cfg, objective)
        tok = load_tokenizer("clip_bpe", cfg.text.context_length, pad_id=0, eos_id=49407)
        d = save_open_clip_directory(
            str(tmp / name), params, cfg, tok, model_state=state, objective=objective
        )
        out[name] = (_ours(model, params, state, cfg, tok), d)
    return out


@pytest.fixture(scope="module")
def reference(exports, tmp_path_factory):
    _need_reference()
    tmp = tmp_path_factory.mktemp("oc_created")
    inputs: dict = {"texts": np.array(TEXTS), "exports": np.array(json.dumps(sorted(exports)))}
    for name, (ours, d) in exports.items():
        inputs[name + "_dir"] = np.array(d)
        inputs[name + "_pixels"] = _normalised(
            _pixels(ours.model_config.vision.image_size), ours.model_config
        )
    raw = _raw()
    inputs.update({f"raw{i}": r for i, r in enumerate(raw)}, n_raw=np.array(len(raw)))
    inputs["created"] = np.array(json.dumps(TINY_OPEN_CLIP))
    for name, cfg in TINY_OPEN_CLIP.items():
        (tmp / name).mkdir()
        inputs[name + "_dir"] = np.array(str(tmp / name))
        inputs[name + "_pixels"] = _normalised(_pixels(cfg["vision_cfg"]["image_size"], seed=2))
    inputs.update(BENCHMARK_INPUTS, benchmark_dir=np.array(exports["run_t5"][1]))
    outputs = run_reference(EXPORTED + CREATED + BENCHMARK, **inputs)
    return outputs, tmp


# --- out ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["run_t5", "vit_bpe", "rn_bpe"])
def test_open_clip_loads_our_export_with_our_ids_and_embeddings(name, exports, reference):
    ref, _ = reference
    ours, _ = exports[name]
    np.testing.assert_array_equal(ref[name + "_ids"], ours.tokenize(TEXTS))
    pixels = _pixels(ours.model_config.vision.image_size)
    assert _max_diff(ref[name + "_img"], ours._encoders.images(ours._variables, pixels)) <= TOL
    assert _max_diff(ref[name + "_txt"], ours.encode_text(TEXTS)) <= TOL


def _same_crop(h: int, w: int, size: int) -> bool:
    """Whether open_clip's CenterCrop (offset rounded half to even) and ours (HF's arithmetic: offset
    floored) cut the same window after the shorter side is resized to `size`."""
    long = int(size * max(h, w) / min(h, w))
    return round((long - size) / 2.0) == (long - size) // 2


def test_open_clip_preprocesses_raw_images_as_we_do(exports, reference):
    ref, _ = reference
    for name, (ours, _) in exports.items():
        size = ours.model_config.vision.image_size
        for i, raw in enumerate(_raw()):
            diff = _max_diff(ref[name + "_pre"][i], _normalised(ours.preprocess(raw), ours.model_config))
            if _same_crop(*raw.shape[:2], size):
                # torchvision's and PIL's bicubic agree to uint8 rounding (1/255/std ~ 0.015).
                assert diff < 0.06, (name, raw.shape)
            else:  # a window one pixel apart: open_clip's own rounding, not expressible in its config
                assert diff > 0.06, (name, raw.shape)


def test_siglip_bias_is_open_clips_logit_bias(exports, reference):
    ref, _ = reference
    ours, d = exports["vit_bpe"]
    cfg = json.load(open(os.path.join(d, "open_clip_config.json")))
    bias = float(ours.params["objective"]["bias"])
    assert cfg["model_cfg"]["init_logit_bias"] == pytest.approx(bias)
    img = ours._encoders.images(ours._variables, _pixels(ours.model_config.vision.image_size))
    want = ours.logit_scale * img @ ours.encode_text(TEXTS).T + bias
    np.testing.assert_allclose(ref["vit_bpe_logits"], want, atol=1e-3)


def test_export_config_says_what_open_clip_needs(exports):
    cfgs = {n: json.load(open(os.path.join(d, "open_clip_config.json"))) for n, (_, d) in exports.items()}
    t5, bpe, rn = (cfgs[n]["model_cfg"] for n in ("run_t5", "vit_bpe", "rn_bpe"))
    assert (t5["text_cfg"]["pool_type"], t5["text_cfg"]["eos_id"], t5["quick_gelu"]) == ("eos", 1, True)
    assert t5["text_cfg"]["hf_tokenizer_name"]
    assert os.path.exists(os.path.join(exports["run_t5"][1], "tokenizer.json"))
    assert bpe["text_cfg"]["pool_type"] == "argmax" and "hf_tokenizer_name" not in bpe["text_cfg"]
    assert bpe["quick_gelu"] is False and bpe["vision_cfg"]["norm_kwargs"] == {"eps": 1e-6}
    assert rn["vision_cfg"]["layers"] == [1, 2, 1, 1] and rn["text_cfg"]["pool_type"] == "eos"
    pre = cfgs["run_t5"]["preprocess_cfg"]
    assert (pre["interpolation"], pre["resize_mode"], pre["size"]) == ("bicubic", "shortest", 32)
    assert cfgs["vit_bpe"]["veclip"]["objective"] == "siglip"


def test_export_refuses_what_open_clip_cannot_hold_before_writing(tmp_path, exports):
    ours, _ = exports["rn_bpe"]
    cfg = ours.model_config.copy_and_resolve_references()
    cfg.vision.heads = 3  # open_clip derives the pool's heads as width * 32 // head_width
    with pytest.raises(OpenClipError, match="vision.heads=3"):
        save_open_clip_directory(
            str(tmp_path / "x"), ours.params, cfg, ours.tokenizer, model_state=ours.model_state
        )
    assert not os.path.exists(tmp_path / "x") and os.listdir(tmp_path) == []


def test_export_replaces_only_an_earlier_export_and_only_with_force(exports, tmp_path):
    ours, earlier = exports["vit_bpe"]
    save = lambda out, **kw: save_open_clip_directory(
        out, ours.params, ours.model_config, ours.tokenizer, **kw
    )
    with pytest.raises(UserError, match="pass --force"):
        save(earlier)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier export"):
        save(str(mine), force=True)
    assert (mine / "notes.txt").read_text() == "mine"
    copy = tmp_path / "copy"
    save(str(copy))
    assert save(str(copy), force=True) == str(copy)  # an open_clip export: replaced
    assert sorted(os.listdir(copy)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["copy", "mine"]  # no temporary left


# --- in -------------------------------------------------------------------------------------------------


def test_our_export_loads_back_with_the_same_embeddings(exports):
    for name, (ours, d) in exports.items():
        back = veclip_jax.load(d, batch_size=8)
        assert back.model_config.vision.type == ours.model_config.vision.type
        assert back.preprocess == ours.preprocess, name
        pixels = _pixels(ours.model_config.vision.image_size)
        assert _max_diff(back._encoders.images(back._variables, pixels),
                         ours._encoders.images(ours._variables, pixels)) <= TOL, name  # fmt: skip
        np.testing.assert_array_equal(back.tokenize(TEXTS), ours.tokenize(TEXTS))
        assert _max_diff(back.encode_text(TEXTS), ours.encode_text(TEXTS)) <= TOL, name


@pytest.mark.parametrize("name", sorted(TINY_OPEN_CLIP))
def test_open_clip_models_load_here_with_their_embeddings(name, reference, monkeypatch):
    ref, tmp = reference
    d = str(tmp / name)
    pixels = _pixels(TINY_OPEN_CLIP[name]["vision_cfg"]["image_size"], seed=2)
    # A bare state dict needs its open_clip model config by name: here a tiny one stands for RN50.
    monkeypatch.setattr(oc_load, "packaged_model_cfg", lambda n: TINY_OPEN_CLIP[n])
    for path, model_name in ((d, None), (d + ".bin", name)):
        m = veclip_jax.load(path, model_name=model_name, batch_size=8)
        np.testing.assert_array_equal(m.tokenize(TEXTS), ref[name + "_ids"])
        assert _max_diff(m._encoders.images(m._variables, pixels), ref[name + "_img"]) <= TOL, path
        assert _max_diff(m.encode_text(TEXTS), ref[name + "_txt"]) <= TOL, path
    assert veclip_jax.load(d).preprocess.method == "bilinear"  # its preprocess_cfg


def test_standalone_evaluation_reads_a_bare_open_clip_state_dict(reference, monkeypatch, tmp_path):
    from PIL import Image

    from veclip_jax.eval.run import evaluate

    _, tmp = reference
    rng = np.random.default_rng(4)
    for c in ("cat", "dog"):
        (tmp_path / "pets" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(
                tmp_path / "pets" / c / f"{i}.png"
            )
    monkeypatch.setattr(oc_load, "packaged_model_cfg", lambda n: TINY_OPEN_CLIP[n])
    out = evaluate(str(tmp / "oc_rn.bin"), [f"folder:{tmp_path / 'pets'}"], model_name="oc_rn",
                   output_dir=str(tmp_path / "results"), batch_size=8, progress=False)  # fmt: skip
    (metrics,) = out.results.values()
    assert 0.0 <= metrics["acc1"] <= 1.0 and out.files


@pytest.mark.parametrize("name", ["RN50-quickgelu", "ViT-B-32"])
def test_full_size_open_clip_state_dicts_fit_our_towers(name, reference):
    ref, _ = reference
    shapes = json.loads(str(ref["shapes_" + name]))
    cfg = model_config_from_open_clip(packaged_model_cfg(name), source=name)
    model = build(cfg)
    state_dict = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory
    params, state = params_from_open_clip(
        state_dict, abstract_params(model), abstract_model_state(model), cfg
    )
    if name.startswith("RN50"):
        assert cfg.act == "quick_gelu" and tuple(cfg.vision.resnet_layers) == (3, 4, 6, 3)
        # open_clip's RN50 image tower: 38,316,896 parameters (RESNET.md), BatchNorm statistics apart.
        assert sum(x.size for x in jax.tree.leaves(params["vision_model"])) == 38_316_896
        assert jax.tree.leaves(state)
    else:
        assert (cfg.vision.patch_size, cfg.vision.width, cfg.text.eos_id) == (32, 768, 49407)


def test_a_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"logit_scale": torch.zeros(()), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(OpenClipError, match="refused: the pickle holds more than tensors"):
        read_state_dict(str(path))
    with pytest.raises(UserError, match="bare state dict: name its open_clip model config"):
        veclip_jax.load(str(tmp_path))  # a directory with only the weights: which model?


def test_init_from_an_open_clip_directory_checks_and_imports(exports, demo_cache, tmp_path):
    from tests.helpers import tiny_run_config
    from veclip_jax.run.checkpoint import restore_params
    from veclip_jax.train import loop

    ours, d = exports["run_t5"]
    c = tiny_run_config(demo_cache, total_steps=1, init_from=d, eval_every=0, checkpoint_every=1)
    c.optim.update(warmup_steps=0, learning_rate=1e-9)  # one step barely moves what init_from gave
    bad = c.copy_and_resolve_references()
    bad.model.text.layers = 3
    with pytest.raises(UserError, match="config.model.text.layers=3 but"):
        loop.train(bad, str(tmp_path / "bad"))
    loop.train(c, str(tmp_path / "ok"))
    got, _ = restore_params(str(tmp_path / "ok"))
    for key in ("vision_model", "text_model", "text_projection", "logit_scale"):
        assert _max_diff_tree(got[key], ours.params[key]) <= 1e-6, key


def _max_diff_tree(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: _max_diff(x, y), a, b)))


# --- CLIP_benchmark --------------------------------------------------------------------------------------

BENCHMARK = """
import sys
import numpy as np
from clip_benchmark.models import load_clip
from clip_benchmark.metrics import zeroshot_classification as zsc, zeroshot_retrieval as zsr
# clip_benchmark 1.6.2's accuracy() calls float() on a one-element array, which numpy 2.4 refuses:
# the same computation with .item() (everything else is its own code).
def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]
zsc.accuracy = accuracy
where = "local-dir:" + str(inputs["benchmark_dir"])
model, transform, tokenizer = load_clip("open_clip", where, None, None, "cpu")
model.eval()
from PIL import Image
class Data(torch.utils.data.Dataset):
    classes = list(inputs["classes"])
    def __len__(self): return len(inputs["labels"])
    def __getitem__(self, i): return transform(Image.fromarray(inputs["images"][i])), int(inputs["labels"][i])
loader = torch.utils.data.DataLoader(Data(), batch_size=4)
templates = ["a photo of a {c}.", "{c}"]
metrics = zsc.evaluate(model, loader, tokenizer, Data.classes, templates, "cpu", amp=False)
classifier = zsc.zero_shot_classifier(model, tokenizer, Data.classes, templates, "cpu", amp=False)
logits, _ = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
outputs.update(acc1=np.array(metrics["acc1"]), zeroshot_logits=logits.numpy())
class Pairs(torch.utils.data.Dataset):
    def __len__(self): return len(inputs["labels"])
    def __getitem__(self, i):
        return transform(Image.fromarray(inputs["images"][i])), [str(inputs["captions"][i])]
collate = lambda b: (torch.stack([x for x, _ in b]), [t for _, t in b])
pairs = torch.utils.data.DataLoader(Pairs(), batch_size=4, collate_fn=collate)
retrieval = zsr.evaluate(model, pairs, tokenizer, "cpu", amp=False, recall_k_list=[1])
outputs.update({"retrieval_" + k: np.array(v) for k, v in retrieval.items()})
"""


_CLASSES = ["red circle", "blue square", "green cross"]
_LABELS = np.array([0, 1, 2, 0, 1, 2])
BENCHMARK_INPUTS = dict(
    images=np.random.default_rng(3).integers(0, 256, (6, 40, 48, 3), dtype=np.uint8),
    labels=_LABELS,
    classes=np.array(_CLASSES),
    captions=np.array([f"a {_CLASSES[i]}" for i in _LABELS]),
)


def test_clip_benchmark_evaluates_an_export_through_its_open_clip_type(exports, reference):
    out, _ = reference
    ours, _ = exports["run_t5"]
    images, labels = BENCHMARK_INPUTS["images"], BENCHMARK_INPUTS["labels"]
    # Our zero-shot on the same images and prompts: CLIP_benchmark's logits are 100 x cosine.
    weights = np.stack([ours.encode_text([f"a photo of a {c}.", c]).mean(0) for c in _CLASSES])
    weights /= np.linalg.norm(weights, axis=-1, keepdims=True)
    want = 100 * ours.encode_image(list(images)) @ weights.T
    np.testing.assert_allclose(out["zeroshot_logits"], want, atol=2e-3)
    assert float(out["acc1"]) == pytest.approx(np.mean(want.argmax(-1) == labels))
    assert "retrieval_image_retrieval_recall@1" in out and "retrieval_text_retrieval_recall@1" in out
