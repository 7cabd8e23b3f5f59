"""Sentencepiece tokenisation in the convention of the released VeCLIP checkpoints.

VeCLIP's checkpoints are used with T5's sentencepiece tokenizer
(`T5Tokenizer.from_pretrained("t5-base")`): pad 0, end-of-text `</s>` 1,
unknown 2, no begin token, `</s>` appended. We follow it exactly, so

  * a user's T5 `spiece.model` works here unchanged, and
  * a model we train loads in transformers as `T5Tokenizer.from_pretrained(dir)`
    with identical ids, and HF CLIP's first-eos pooling finds our `</s>`.

A sequence is: at most `context_length - 1` pieces, then `</s>`, then pad 0 up
to `context_length`. `</s>` is therefore always present and always ends the
kept text, even when the caption was truncated.

Train a model from shards' captions (both fields) with
    python launch/make_tokenizer.py --input='data/train-*.array_record' --out=spiece.model

`load_tokenizer` also takes a HuggingFace tokenizer directory (`HFTokenizer`)
and CLIP's BPE, `data.tokenizer="clip_bpe"` (veclip_jax/data/bpe.py: open_clip's
ids, start 49406, end 49407, padding 0).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import sentencepiece as spm

from veclip_jax import fileio
from veclip_jax.data import captions, records
from veclip_jax.errors import TokenizerError  # TokenizerError: its home is errors.py

if TYPE_CHECKING:
    from veclip_jax.data.bpe import ClipBpeTokenizer

# T5's ids (and therefore VeCLIP's). Also the defaults of configs/base.py.
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class Tokenizer:
    """A sentencepiece model that encodes to fixed-length int32 id rows.

    Pickles as the model's bytes (a few hundred KiB), so it travels to grain's
    spawned worker processes without a shared file system.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        context_length: int,
        *,
        pad_id: int = PAD_ID,
        eos_id: int = EOS_ID,
    ):
        path = os.path.expanduser(os.fspath(model_file))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        with open(path, "rb") as f:
            proto = f.read()
        self._init(proto, context_length, pad_id, eos_id, name=path)

    @classmethod
    def from_bytes(
        cls, proto: bytes, context_length: int, *, pad_id: int = PAD_ID, eos_id: int = EOS_ID
    ) -> Tokenizer:
        """A tokenizer from a serialised sentencepiece model."""
        self = cls.__new__(cls)
        self._init(proto, context_length, pad_id, eos_id, name="<bytes>")
        return self

    def _init(self, proto: bytes, context_length: int, pad_id: int, eos_id: int, name: str) -> None:
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as e:
            raise TokenizerError(f"not a sentencepiece model: {name}: {str(e).strip()}") from e
        # Checked up front: a model with other ids would train fine and then
        # export a checkpoint that pools the wrong token in transformers.
        if sp.pad_id() != pad_id or sp.eos_id() != eos_id:
            raise TokenizerError(
                f"sentencepiece model {name} has pad id {sp.pad_id()} and end-of-text id {sp.eos_id()}; "
                f"the model config expects pad {pad_id} and end-of-text {eos_id} (T5's convention). "
                "Train one with `python launch/make_tokenizer.py`, or use a T5 spiece.model."
            )
        self._proto = proto
        self._sp = sp
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.eos_id = int(eos_id)

    def __getstate__(self) -> dict:
        return {
            "proto": self._proto,
            "context_length": self.context_length,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
        }

    def __setstate__(self, state: dict) -> None:
        self._init(state["proto"], state["context_length"], state["pad_id"], state["eos_id"], name="<pickle>")

    @property
    def vocab_size(self) -> int:
        """Number of ids the model can produce (pieces, including pad/eos/unk)."""
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def model_proto(self) -> bytes:
        """The serialised sentencepiece model (what an export writes as spiece.model)."""
        return self._proto

    def encode(self, text: str) -> list[int]:
        """The piece ids of `text`, without end-of-text or padding."""
        return self._sp.encode(text, out_type=int)

    def _pad(self, ids: Sequence[int], out: np.ndarray) -> None:
        n = min(len(ids), self.context_length - 1)
        out[:n] = ids[:n]
        out[n] = self.eos_id
        out[n + 1 :] = self.pad_id

    def encode_padded(self, text: str) -> np.ndarray:
        """int32 [context_length]: pieces (truncated), end-of-text, then padding."""
        out = np.empty(self.context_length, np.int32)
        self._pad(self.encode(text), out)
        return out

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), context_length], each row as in `encode_padded`."""
        ids = self._sp.encode(list(texts), out_type=int)
        out = np.empty((len(ids), self.context_length), np.int32)
        for row, seq in zip(out, ids, strict=True):
            self._pad(seq, row)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of one id row, up to its first end-of-text."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._sp.decode([i for i in ids if i != self.pad_id])


class HFTokenizer:
    """A HuggingFace tokenizer directory (e.g. OpenAI CLIP's BPE) behind `Tokenizer`'s interface.

    Rows are what `tokenizer(texts, padding="max_length", truncation=True,
    max_length=context_length)` gives: the tokenizer's own begin/end tokens,
    its padding. `eos_id` must be its end-of-text id (the model pools there).
    """

    def __init__(self, directory: str | os.PathLike, context_length: int, *, eos_id: int):
        from transformers import AutoTokenizer

        self.directory = os.path.expanduser(os.fspath(directory))
        try:
            self._tok = AutoTokenizer.from_pretrained(self.directory)
        except Exception as e:  # transformers' errors for a directory it cannot read
            why = (str(e).strip().splitlines() or [""])[0]
            raise TokenizerError(
                f"not a HF tokenizer directory: {self.directory}: {type(e).__name__}: {why}"
            ) from e
        if self._tok.eos_token_id != eos_id:
            raise TokenizerError(
                f"tokenizer {self.directory} ends texts with id {self._tok.eos_token_id}, "
                f"the model config expects end-of-text {eos_id} (model.text.eos_id)"
            )
        self.context_length = int(context_length)
        self.eos_id = int(eos_id)
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else eos_id)
        if self._tok.pad_token_id is None:
            self._tok.pad_token_id = self.pad_id

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def hf(self) -> Any:
        """The transformers tokenizer itself."""
        return self._tok

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), context_length]."""
        enc = self._tok(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="np",
        )
        return np.asarray(enc["input_ids"], np.int32)

    def encode_padded(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def is_hf_tokenizer_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a HuggingFace tokenizer."""
    p = os.path.expanduser(os.fspath(path))
    return os.path.isdir(p) and any(
        os.path.exists(os.path.join(p, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    )


def load_tokenizer(
    path: str | os.PathLike, context_length: int, *, pad_id: int, eos_id: int
) -> Tokenizer | HFTokenizer | ClipBpeTokenizer:
    """A sentencepiece model file (T5 convention), a HuggingFace tokenizer directory, or CLIP's BPE
    (the built-in name "clip_bpe", or a copy of its `.txt.gz` merges file: veclip_jax/data/bpe.py)."""
    from veclip_jax.data import bpe

    if bpe.is_clip_bpe(path):
        return bpe.ClipBpeTokenizer(path, context_length, pad_id=pad_id, eos_id=eos_id)
    if is_hf_tokenizer_dir(path):
        return HFTokenizer(path, context_length, eos_id=eos_id)
    return Tokenizer(path, context_length, pad_id=pad_id, eos_id=eos_id)


def train_tokenizer(
    texts: Iterable[str],
    out: str | os.PathLike,
    *,
    vocab_size: int = 32000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentences: int = 5_000_000,
    num_threads: int = 2,
) -> str:
    """Trains a sentencepiece model with T5's special ids; writes it to `out`; returns the path.

    ids: pad 0 `<pad>`, end-of-text 1 `</s>`, unknown 2 `<unk>`, no begin
    token. `vocab_size` is an upper bound: on a small corpus the model is as
    large as the corpus supports (sentencepiece's hard_vocab_limit=False).
    T5's own model is unigram with NFKC normalisation, which are the defaults.
    Empty texts are skipped; at most `max_sentences` texts are read.
    """
    out = os.path.expanduser(os.fspath(out))

    def sentences() -> Iterator[str]:
        n = 0
        for t in texts:
            if t:
                yield t
                n += 1
                if n >= max_sentences:
                    return

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fileio.atomic_write_bytes(out, model.getvalue())  # a concurrent reader never sees half a model
    return out


def shard_captions(spec: str | Sequence[str]) -> Iterator[str]:
    """Both captions (AltText and VeCap) of every record of the shards, cleaned, non-empty."""
    for path in records.shard_paths(spec):
        reader = records.RecordReader([path])
        for i in range(len(reader)):
            try:
                rec = records.decode_record(reader.raw(i))
            except records.RecordFormatError:
                continue  # the pipeline skips these too
            for text in (rec.alt_text, rec.vecap_text):
                text = captions.clean_caption(text)
                if text:
                    yield text


def train_tokenizer_from_shards(spec: str | Sequence[str], out: str | os.PathLike, **kwargs) -> str:
    """Trains a tokenizer on the captions (both fields) of ArrayRecord shards."""
    return train_tokenizer(shard_captions(spec), out, **kwargs)
