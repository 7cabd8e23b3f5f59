"""CLIP's BPE as data.tokenizer="clip_bpe" (veclip_jax/data/bpe.py): open_clip's ids, kept by a run,
exported to transformers, the DeCLIP mask token past it."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest

from tests.helpers import tiny_run_config
from tests.openclip_ref import available, run_reference
from veclip_jax.data import bpe
from veclip_jax.data.tokenizer import TokenizerError, load_tokenizer
from veclip_jax.errors import UserError

CORPUS = [
    "a photo of a cat",
    "Hello, World!",
    "Café naïve résumé à la carte, Ångström, Øresund",
    "🙂👍🏽 emoji 🐈‍⬛ and flags 🇯🇵",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39; &amp;amp; twice",
    "The Mona Lisa doesnâ€™t have eyebrows.",  # mojibake that ftfy repairs
    "Ã©tÃ© Ã  Paris",
    "  multiple   spaces\n\nand newlines\tand tabs \r\n end  ",
    "",
    "   ",
    "123456 3.14159 1,000,000 2024-01-31 #42 $9.99 50%",
    "punctuation!!! ... ?!? -- (brackets) [x] {y} <z> @user #tag",
    "中文字幕：一只猫坐在沙发上。日本語のテキスト、한국어 텍스트",
    "it's they're I'M we've you'll he'd don't",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ﬁ ligature",
    "İstanbul ΣΟΦΟΣ straße",
    "e\u0301 combining, zero\u200bwidth, nbsp\u00a0here, ideographic\u3000space",
    "foo<end_of_text>bar <start_of_text>",
    "IMG_4821.JPG",
    "a " * 100,
    "An image of a large blue square at the top left and a small green cross in the center, on a white "
    "background, with a very long description that goes on and on " * 3,
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Unicode soup: ASCII, Latin-1, Greek, CJK, emoji, odd whitespace, combining marks, ligatures."""
    rng = random.Random(seed)
    codes = [*range(32, 127), *range(0xA0, 0x250), *range(0x370, 0x400), *range(0x4E00, 0x4E40)]
    codes += [0x1F600, 0x1F44D, 0x1F3FD, 0x200B, 0x3000, 0x2028, 0x85, 0x301, 0xFB01, 0xFF21, 0x2019, 0x201C]
    alphabet = [chr(c) for c in codes] + ["&amp;", "&lt;", "\n", "\t"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


TEXTS = CORPUS + _random_texts(400)


def _skip_without_open_clip() -> None:
    if why := available():
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("clip_bpe", 77, pad_id=0, eos_id=49407)


@pytest.fixture(scope="module")
def reference():
    """open_clip's `tokenize` on TEXTS at context 77 and 16 (truncating most of them)."""
    _skip_without_open_clip()
    code = (
        "from open_clip.tokenizer import tokenize\n"
        "texts = [str(t) for t in inputs['texts']]\n"
        "outputs['ids'] = tokenize(texts).numpy()\n"
        "outputs['ids16'] = tokenize(texts, context_length=16).numpy()\n"
    )
    return run_reference(code, texts=np.array(TEXTS))


def test_ids_equal_open_clips_tokenize_on_a_varied_corpus(tok, reference):
    ours = tok.encode_batch(TEXTS)
    assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
    bad = [t for t, a, b in zip(TEXTS, ours, reference["ids"], strict=True) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} texts differ from open_clip, e.g. {bad[:3]!r}"
    rows = np.stack([tok.encode_padded(t) for t in CORPUS])  # the per-example path of the pipeline
    np.testing.assert_array_equal(rows, reference["ids"][: len(CORPUS)])


def test_truncation_keeps_the_end_token_last_as_open_clip(reference):
    short = load_tokenizer("clip_bpe", 16, pad_id=0, eos_id=49407)
    ours = short.encode_batch(TEXTS)
    np.testing.assert_array_equal(ours, reference["ids16"])
    long_row = ours[CORPUS.index("a " * 100)]
    assert long_row[0] == bpe.SOT_ID and long_row[-1] == bpe.EOS_ID and (long_row[1:-1] == 320).all()


def test_the_row_layout(tok):
    row = tok.encode_padded("a photo of a cat")
    assert row[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (row[7:] == 0).all()
    assert tok.encode_padded("")[:3].tolist() == [49406, 49407, 0]
    assert tok.decode(row) == "a photo of a cat"
    assert tok.decode(tok.encode_padded("Café, NAÏVE!")) == "café , naïve !"
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.special_ids) == (49408, 0, 49407, (49406, 49407))


def test_the_ascii_fast_path_cleans_as_ftfy_and_html(monkeypatch):
    # clean() skips ftfy and html for printable ASCII without "&": the same result as running them.
    import ftfy

    rng = random.Random(1)
    alphabet = [chr(c) for c in range(32, 127) if c != ord("&")] + [";", "#", "<", ">", "'", '"', "  "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["IT'S A Dog", "x" * 500, "lt; gt; #39; quot;", "\\x1b[31m red", "--> <-- ''quoted''"]
    full = [" ".join(bpe.html.unescape(bpe.html.unescape(ftfy.fix_text(t))).split()).lower() for t in texts]
    assert [bpe.clean(t) for t in texts] == full


def test_pickles_as_its_vocabulary_for_worker_processes(tok, monkeypatch):
    data = pickle.dumps(tok)
    assert len(data) < 2_000_000
    monkeypatch.setattr(bpe, "_open_clip_dirs", lambda: [])  # a worker needs no open_clip to unpickle
    back = pickle.loads(data)
    np.testing.assert_array_equal(back.encode_batch(CORPUS), tok.encode_batch(CORPUS))
    assert back.context_length == 77


def test_missing_vocabulary_is_a_clear_user_error(monkeypatch, tmp_path, demo_cache):
    monkeypatch.setattr(bpe, "_open_clip_dirs", lambda: [str(tmp_path)])  # open_clip without its file
    with pytest.raises(TokenizerError, match=r"requirements-nodeps\.txt") as e:
        load_tokenizer("clip_bpe", 77, pad_id=0, eos_id=49407)
    assert isinstance(e.value, UserError) and "bpe_simple_vocab_16e6.txt.gz" in str(e.value)
    from veclip_jax.data.pipeline import resolve_sources

    config = tiny_run_config(demo_cache)
    config.data.tokenizer = "clip_bpe"
    with pytest.raises(TokenizerError, match="open_clip"):
        resolve_sources(config)


def test_a_config_with_other_ids_is_refused_naming_the_fields(tmp_path):
    with pytest.raises(TokenizerError, match=r"model\.text\.eos_id=49407 and model\.text\.vocab_size=49408"):
        load_tokenizer("clip_bpe", 77, pad_id=0, eos_id=1)  # T5's end-of-text, configs/base.py's default
    (tmp_path / "junk.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(TokenizerError, match="not a gzipped CLIP BPE merges file"):
        load_tokenizer(str(tmp_path / "junk.txt.gz"), 77, pad_id=0, eos_id=49407)


def test_declips_mask_token_is_the_id_past_the_vocabulary(tok):
    from veclip_jax import defaults
    from veclip_jax.data.preprocess import _mask_spec

    config = defaults.get_config()
    config.model.text.update(vocab_size=49409, eos_id=49407, pad_id=0, mask_id=-1)  # DeCLIP
    spec = _mask_spec(config, tok)
    assert spec.mask_id == 49408 and spec.vocab_size == 49408
    assert {0, 49406, 49407, 49408} <= set(spec.not_random) and {49406, 49407} <= set(spec.special)
    config.model.text.vocab_size = 49408  # CLIP's table: no room for a mask token
    with pytest.raises(ValueError, match=r"-1, i\.e\. 49408, the id past the tokenizer's"):
        _mask_spec(config, tok)


def test_a_workdir_keeps_the_vocabulary_and_refuses_another_tokenizer(tmp_path):
    from veclip_jax.errors import ConfigError
    from veclip_jax.run.workdir import find_tokenizer, keep_tokenizer

    workdir = str(tmp_path / "run")
    kept = keep_tokenizer(workdir, "clip_bpe", writer=True)
    assert kept == os.path.join(workdir, "bpe_simple_vocab_16e6.txt.gz") == find_tokenizer(workdir)
    with open(kept, "rb") as f, open(bpe.vocab_path(), "rb") as g:
        assert f.read() == g.read()
    assert keep_tokenizer(workdir, bpe.vocab_path(), writer=True) == kept  # the same: accepted
    spm = tmp_path / "spiece.model"
    spm.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer"):
        keep_tokenizer(workdir, str(spm), writer=True)
    other = tmp_path / "other"
    keep_tokenizer(str(other), str(spm), writer=True)
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer \(.*bpe_simple_vocab_16e6\.txt\.gz\)"):
        keep_tokenizer(str(other), "clip_bpe", writer=True)


def test_hf_export_writes_a_clip_tokenizer_transformers_loads_with_our_ids(tok, tmp_path):
    import transformers

    from veclip_jax.hf.to_hf import hf_tokenizer

    hf_tokenizer(tok, 77).save_pretrained(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(hf, transformers.CLIPTokenizer) and (hf.bos_token_id, hf.eos_token_id) == (49406, 49407)
    # Equal ids wherever transformers' normaliser (NFC, whitespace, lower-case) gives open_clip's cleaned
    # text: not for mojibake or HTML entities (no ftfy), fullwidth letters, a final sigma (Python's lower()
    # writes "ς"), nor for the literal text of open_clip's special tokens (named <|...|> in HF).
    norm = hf.backend_tokenizer.normalizer.normalize_str
    same = [t for t in TEXTS if norm(t).strip() == bpe.clean(t) and "_of_text>" not in t]
    assert len(same) >= 150 and "Hello, World!" in same and "a " * 100 in same
    ours = tok.encode_batch(same)
    theirs = hf(same, padding="max_length", truncation=True, max_length=77, return_tensors="np")["input_ids"]
    end = np.argmax(ours == 49407, axis=1)
    for o, t, e in zip(ours, theirs, end, strict=True):
        np.testing.assert_array_equal(t[: e + 1], o[: e + 1])  # through the end token
        assert (t[e + 1 :] == 49407).all()  # OpenAI's HF padding; CLIP pools at the first end token


def test_a_run_trains_keeps_exports_and_loads_with_clip_bpe(tmp_path, demo_cache):
    """data.tokenizer="clip_bpe" through train (vocab check), workdir, export and veclip_jax.load."""
    import torch
    import transformers

    import veclip_jax
    from veclip_jax.hf.to_hf import export_checkpoint
    from veclip_jax.train import loop

    config = tiny_run_config(demo_cache, total_steps=3, checkpoint_every=3, eval_every=3)
    config.data.tokenizer = "clip_bpe"
    config.model.text.update(vocab_size=49409, eos_id=49407, pad_id=0)
    workdir = str(tmp_path / "run")
    loop.train(config, workdir)
    assert os.path.isfile(os.path.join(workdir, "bpe_simple_vocab_16e6.txt.gz"))
    out = export_checkpoint(workdir, str(tmp_path / "hf"))
    ours = veclip_jax.load(workdir)
    assert isinstance(ours.tokenizer, bpe.ClipBpeTokenizer)
    texts = ["a red circle.", "A BLUE square, top left!", "", "very long " * 40]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        txt = hf.get_text_features(**{k: ids[k] for k in ("input_ids", "attention_mask")})
    txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1).numpy()
    assert float(np.max(np.abs(txt - ours.encode_text(texts)))) < 1e-4

    config.model.text.vocab_size = 49400  # fewer rows than the tokenizer's ids: refused before any work
    with pytest.raises(loop.ConfigError, match=r"eos_id=49407 is outside vocab_size=49400"):
        loop.train(config, str(tmp_path / "small"))
