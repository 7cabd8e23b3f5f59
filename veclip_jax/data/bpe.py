"""CLIP's BPE tokenizer (OpenAI CLIP, open_clip, the DeCLIP toolkit): `data.tokenizer="clip_bpe"`.

Ids are those of open_clip's `tokenize` (its `SimpleTokenizer`), which the
parity test checks on a varied corpus against open_clip itself:

  * 49,408 ids: 256 byte symbols, their end-of-word (`</w>`) forms, the first
    48,894 merges of `bpe_simple_vocab_16e6.txt.gz`, then `<start_of_text>`
    49406 and `<end_of_text>` 49407;
  * text cleaned as open_clip's "lower" cleaning: ftfy, HTML unescaped twice,
    whitespace runs to one space, stripped, lower-cased;
  * a row is `<start_of_text>`, the pieces, `<end_of_text>`, then 0 up to
    `context_length` (open_clip pads with 0, which is also the piece "!": the
    model pools at the first end-of-text, so padding is never read); a longer
    text is cut to `context_length` ids with the end token kept last.

The DeCLIP toolkit's masked-language-model token is the first id past these
(49408): `model.text.mask_id=-1` with `model.text.vocab_size=49409`; plain
CLIP uses `model.text.vocab_size=49408`.

The vocabulary file ships inside the open_clip package (installed without its
dependencies, requirements-nodeps.txt), so it is found offline and never
imported (open_clip's import needs torchvision). `data.tokenizer` may also be
a path to a copy of the file (a name ending in `.txt.gz`): what a run keeps
in its workdir, so that evaluation, export and `veclip_jax.load` read the
very vocabulary the run trained with.

Why HF `tokenizers` underneath: a maintained BPE (Rust) rather than a copy of
open_clip's, while the cleaning stays open_clip's own Python steps,
because transformers' CLIP normaliser (NFC, no ftfy, no HTML unescaping)
gives other ids on repaired or escaped text. The export (`to_hf`) is
transformers' `CLIPTokenizer`, which has no ftfy step: it gives these ids
(through the end token; it pads with 49407) on any text the cleaning leaves
unchanged (see `to_hf`).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from veclip_jax.errors import TokenizerError

NAME = "clip_bpe"  # the built-in name accepted as config.data.tokenizer
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # its name in open_clip and in a run's workdir
NUM_MERGES = 49152 - 256 - 2  # open_clip's (and OpenAI's) cut of the merges list
SOT_ID = 49406  # <start_of_text>
EOS_ID = 49407  # <end_of_text>
PAD_ID = 0  # open_clip's padding
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
SPECIALS = ("<start_of_text>", "<end_of_text>")
# open_clip's pre-tokenisation pattern (its special tokens first, then contractions, letters, one
# digit, other non-space runs), used on lower-cased text.
PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def is_clip_bpe(path: str | os.PathLike) -> bool:
    """Whether `path` names CLIP's BPE: the built-in name, or a `.txt.gz` merges file."""
    p = os.fspath(path)
    return p == NAME or p.endswith(".txt.gz")


def _open_clip_dirs() -> list[str]:
    """Where the open_clip package lies (never imported: its import needs torchvision)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec else []


def vocab_path() -> str:
    """The path of open_clip's `bpe_simple_vocab_16e6.txt.gz`, or TokenizerError saying how to get it."""
    for d in _open_clip_dirs():
        path = os.path.join(d, VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise TokenizerError(
        f'data.tokenizer="{NAME}" reads CLIP\'s BPE vocabulary {VOCAB_FILE} from the open_clip package, '
        "which is not installed here: `pip install --no-deps -r requirements-nodeps.txt` (part of "
        "`make setup`), or set data.tokenizer to a copy of the file"
    )


def resolve(path: str | os.PathLike) -> str:
    """The vocabulary file that `path` (the built-in name or a file path) stands for."""
    return vocab_path() if os.fspath(path) == NAME else os.path.expanduser(os.fspath(path))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the BPE runs on these characters)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def vocabulary(gz: bytes, name: str = "<bytes>") -> tuple[list[str], list[tuple[str, str]]]:
    """(pieces in id order without the two specials, merges) derived from the gzipped merges file
    exactly as open_clip derives them."""
    try:
        lines = gzip.decompress(gz).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TokenizerError(f"not a gzipped CLIP BPE merges file: {name}: {e}") from e
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(
            f"{name} is not CLIP's BPE merges file: it needs a header line and {NUM_MERGES} merges "
            "of two symbols each"
        )
    symbols = list(bytes_to_unicode().values())
    pieces = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    return pieces, merges  # type: ignore[return-value]


def clean(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy, HTML unescaped twice, whitespace collapsed, lower-cased."""
    # Printable ASCII without "&" is what ftfy and html leave alone (a test fuzzes this): most captions
    # skip the two slowest steps.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _backend(pieces: list[str], merges: list[tuple[str, str]]) -> Any:
    """A `tokenizers` BPE with open_clip's pre-tokenisation (the text arrives cleaned: no normaliser)."""
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {p: i for i, p in enumerate([*pieces, *SPECIALS])}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
        # open_clip maps each pre-token's UTF-8 bytes to characters, with no second split.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    # open_clip matches its special tokens' text inside captions too: the same here.
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    return tok


class ClipBpeTokenizer:
    """CLIP's BPE behind `veclip_jax.data.tokenizer.Tokenizer`'s interface (encode_batch, encode_padded,
    decode, vocab_size, pad_id, eos_id). Pickles as the gzipped vocabulary (1.3 MB), so it travels to
    grain's worker processes without a shared file system."""

    def __init__(
        self,
        vocab_file: str | os.PathLike = NAME,
        context_length: int = CONTEXT_LENGTH,
        *,
        pad_id: int = PAD_ID,
        eos_id: int = EOS_ID,
    ):
        path = resolve(vocab_file)
        if not os.path.isfile(path):
            raise TokenizerError(f"CLIP BPE vocabulary not found: {path}")
        with open(path, "rb") as f:
            gz = f.read()
        self._init(gz, context_length, pad_id, eos_id, name=path)

    @classmethod
    def from_bytes(
        cls, gz: bytes, context_length: int = CONTEXT_LENGTH, *, pad_id: int = PAD_ID, eos_id: int = EOS_ID
    ) -> ClipBpeTokenizer:
        """A tokenizer from the gzipped merges file's bytes."""
        self = cls.__new__(cls)
        self._init(gz, context_length, pad_id, eos_id, name="<bytes>")
        return self

    def _init(self, gz: bytes, context_length: int, pad_id: int, eos_id: int, name: str) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        # Checked up front, as for sentencepiece: other ids would train and then pool the wrong token.
        if pad_id != PAD_ID or eos_id != EOS_ID:
            raise TokenizerError(
                f"CLIP's BPE pads with {PAD_ID} and ends texts with {EOS_ID}; the model config has "
                f"model.text.pad_id={pad_id}, model.text.eos_id={eos_id}: set model.text.pad_id={PAD_ID}, "
                f"model.text.eos_id={EOS_ID} and model.text.vocab_size={VOCAB_SIZE} (CLIP) or "
                f"{VOCAB_SIZE + 1} (DeCLIP's mask token)"
            )
        self._pieces, self._merges = vocabulary(gz, name)
        self._tok = _backend(self._pieces, self._merges)
        self._gz = gz
        self.name = name
        self.context_length = int(context_length)
        self.pad_id = PAD_ID
        self.eos_id = EOS_ID
        self.sot_id = SOT_ID
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    def __getstate__(self) -> dict:
        return {"gz": self._gz, "context_length": self.context_length, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self._init(state["gz"], state["context_length"], PAD_ID, EOS_ID, name=state["name"])

    @property
    def vocab_size(self) -> int:
        """49,408: the ids the tokenizer produces (a mask token, if any, is the next id)."""
        return len(self._pieces) + len(SPECIALS)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The start and end tokens (never selected for masking)."""
        return (SOT_ID, EOS_ID)

    @property
    def vocab_bytes(self) -> bytes:
        """The gzipped merges file (what a run keeps in its workdir)."""
        return self._gz

    def encode(self, text: str) -> list[int]:
        """The piece ids of `text` (cleaned), without start, end or padding."""
        return self._tok.encode(clean(text), add_special_tokens=False).ids

    def _row(self, ids: Sequence[int], out: np.ndarray) -> None:
        n = min(len(ids), self.context_length - 2)  # open_clip: cut to L ids, then the last one is the end
        out[0] = SOT_ID
        out[1 : n + 1] = ids[:n]
        out[n + 1] = EOS_ID
        out[n + 2 :] = PAD_ID

    def encode_padded(self, text: str) -> np.ndarray:
        """int32 [context_length]: start, pieces (truncated), end, then padding 0."""
        out = np.empty(self.context_length, np.int32)
        self._row(self.encode(text), out)
        return out

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), context_length], each row as in `encode_padded` (open_clip's `tokenize`)."""
        # ids only (no offsets): the faster of tokenizers' batch encoders
        encs = self._tok.encode_batch_fast([clean(t) for t in texts], add_special_tokens=False)
        out = np.empty((len(encs), self.context_length), np.int32)
        for row, enc in zip(out, encs, strict=True):
            self._row(enc.ids, row)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of one id row (as open_clip decodes: `</w>` -> space, stripped), from after its start
        token to its first end token."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == SOT_ID:
            ids = ids[1:]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        text = "".join(self._pieces[i] for i in ids if 0 <= i < len(self._pieces))
        data = bytearray(self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def to_hf(self) -> Any:
        """transformers' `CLIPTokenizer` with these ids, what an HF export writes.

        The vocabulary of OpenAI's `openai/clip-vit-*` repositories (their specials are named
        `<|startoftext|>`/`<|endoftext|>`, same ids) and their padding, `<|endoftext|>`: rows equal
        ours through the end token, and pad with 49407 where we pad with 0. CLIP pools at the first
        end token under a causal mask, so padding never reaches an embedding. Padding with "!" (id 0,
        as LAION's open_clip uploads do) would make transformers match every "!" of a caption as the
        pad token (id 0, not open_clip's 256). Rows are equal for any text that open_clip's cleaning
        leaves as it is but for lower-casing and whitespace (transformers normalises with NFC and does
        not repair mojibake or unescape HTML entities).
        """
        import transformers

        hf_specials = ("<|startoftext|>", "<|endoftext|>")
        vocab = {p: i for i, p in enumerate([*self._pieces, *hf_specials])}
        return transformers.CLIPTokenizer(
            vocab=vocab,
            merges=list(self._merges),
            bos_token=hf_specials[0],
            eos_token=hf_specials[1],
            unk_token=hf_specials[1],
            pad_token=hf_specials[1],
            model_max_length=self.context_length,
        )
