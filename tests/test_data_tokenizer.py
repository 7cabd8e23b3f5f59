"""Sentencepiece in T5's convention: ids, end-of-text always present, truncation, training CLI."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from veclip_jax.cli import make_tokenizer
from veclip_jax.data import records, tokenizer
from veclip_jax.data.records import Record
from veclip_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer

_WORDS = (
    "red green blue circle square triangle large small top left right bottom background image of a the on"
).split()


def _corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("spm") / "spiece.model"
    return tokenizer.train_tokenizer(_corpus(), out, vocab_size=120, num_threads=1)


def test_trained_model_uses_t5_ids(model_file):
    sp = spm.SentencePieceProcessor(model_file=model_file)
    assert (
        (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (PAD_ID, EOS_ID, UNK_ID, -1) == (0, 1, 2, -1)
    )
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert 20 < sp.get_piece_size() <= 120


def test_every_row_ends_its_kept_text_with_end_of_text(model_file):
    L = 8
    tok = Tokenizer(model_file, L)
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(_WORDS, size=int(rng.integers(0, 20)))) for _ in range(300)] + [
        "",
        "zzz ✓ §",
    ]
    rows = tok.encode_batch(texts)
    assert rows.dtype == np.int32 and rows.shape == (len(texts), L)
    for text, row in zip(texts, rows, strict=True):
        pieces = tok.encode(text)
        kept = min(len(pieces), L - 1)
        assert list(row[:kept]) == pieces[:kept]  # truncation keeps the prefix
        assert row[kept] == EOS_ID  # always present, right after the kept text
        assert (row[kept + 1 :] == PAD_ID).all()
        assert EOS_ID not in row[:kept] and PAD_ID not in row[:kept]


def test_long_text_is_truncated_to_context_minus_one_pieces_then_eos(model_file):
    tok = Tokenizer(model_file, 5)
    row = tok.encode_padded("red green blue circle square triangle large small")
    assert row[-1] == EOS_ID and PAD_ID not in row
    assert list(row[:4]) == tok.encode("red green blue circle square triangle large small")[:4]


def test_context_length_one_holds_only_eos(model_file):
    assert Tokenizer(model_file, 1).encode_batch(["red circle", ""]).tolist() == [[EOS_ID], [EOS_ID]]


def test_encode_batch_equals_encode_padded_and_decodes_back(model_file):
    tok = Tokenizer(model_file, 16)
    texts = ["a red circle on the left", "blue square", ""]
    rows = tok.encode_batch(texts)
    assert all((r == tok.encode_padded(t)).all() for r, t in zip(rows, texts, strict=True))
    assert [tok.decode(r) for r in rows] == texts


def test_unknown_characters_map_to_unk(model_file):
    tok = Tokenizer(model_file, 16)
    assert UNK_ID in tok.encode("red 漢字")


def test_tokenizer_pickles_with_its_model(model_file, tmp_path):
    tok = Tokenizer(model_file, 12)
    copy = tmp_path / "m.model"
    shutil.copy(model_file, copy)
    tok = Tokenizer(copy, 12)
    copy.unlink()  # a spawned worker may not see the file: the pickle carries the model
    back = pickle.loads(pickle.dumps(tok))
    assert back.vocab_size == tok.vocab_size
    assert (back.encode_batch(["red circle top"]) == tok.encode_batch(["red circle top"])).all()


def test_model_with_other_special_ids_is_rejected(tmp_path):
    # sentencepiece's defaults (unk 0, bos 1, eos 2, no pad) are not T5's.
    prefix = tmp_path / "default"
    (tmp_path / "c.txt").write_text("\n".join(_corpus(200)))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"), model_prefix=str(prefix), vocab_size=60, hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="pad id -1 and end-of-text id 2"):
        Tokenizer(f"{prefix}.model", 8)


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        Tokenizer(tmp_path / "nothere.model", 8)


def test_cli_trains_from_both_caption_fields_of_shards(tmp_path, capsys):
    # "zebra" only ever appears in VeCap, "quokka" only in AltText: both must be learnt.
    recs = [
        Record(key=f"{i}", jpeg=b"x", alt_text=f"quokka {t}" if i % 2 else None, vecap_text=f"zebra {t}")
        for i, t in enumerate(_corpus(300, seed=2))
    ]
    shards = records.write_shards(recs, str(tmp_path / "s"), 2)
    out = tmp_path / "out" / "spiece.model"
    make_tokenizer.main(
        [f"--input={tmp_path}/s-*.array_record", f"--out={out}", "--vocab_size=150", "--num_threads=1"]
    )
    assert "pieces" in capsys.readouterr().err
    tok = Tokenizer(out, 16)
    assert tok.vocab_size <= 150
    for word in ("zebra", "quokka"):
        assert UNK_ID not in tok.encode(word)
        assert tok.decode(tok.encode_padded(word)) == word
    assert len(list(tokenizer.shard_captions(shards))) == 300 + 150


def test_loads_in_transformers_as_t5_tokenizer_with_identical_ids(model_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    shutil.copy(model_file, tmp_path / "spiece.model")
    hf = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0)
    ours = Tokenizer(model_file, 12)
    for text in ["a red circle on the left", "blue"]:
        got = hf(text, padding="max_length", max_length=12, truncation=True)["input_ids"]
        assert got == ours.encode_padded(text).tolist()
