"""Trains a sentencepiece tokenizer on the captions of ArrayRecord shards (veclip_jax.data.tokenizer):

    python launch/make_tokenizer.py --input='/data/vecap/train-*.array_record' \\
        --out=/data/vecap/spiece.model --vocab_size=32000

Both caption fields (AltText and VeCap) of every record, cleaned as for training, at most
--max_sentences of them. The model has T5's ids (pad 0, eos 1, unk 2, no bos), so it exports as a
`T5Tokenizer`; point `config.data.tokenizer` at it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from veclip_jax.data.tokenizer import Tokenizer, train_tokenizer_from_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python launch/make_tokenizer.py",
        description="Train a sentencepiece tokenizer (T5 ids: pad 0, eos 1, unk 2, no bos) "
        "from the AltText and VeCap captions of ArrayRecord shards.",
    )
    p.add_argument("--input", required=True, help="shards: comma-separated paths or globs")
    p.add_argument("--out", required=True, help="where to write the model, e.g. spiece.model")
    p.add_argument("--vocab_size", type=int, default=32000, help="upper bound on the vocabulary")
    p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--character_coverage", type=float, default=0.9995)
    p.add_argument("--max_sentences", type=int, default=5_000_000, help="captions read at most")
    p.add_argument("--num_threads", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Trains the model and says where it went and how many pieces it has."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    path = train_tokenizer_from_shards(
        args.input,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        max_sentences=args.max_sentences,
        num_threads=args.num_threads,
    )
    tok = Tokenizer(path, context_length=2)
    print(f"wrote {path}: {tok.vocab_size} pieces in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def run() -> None:
    """The console script `veclip-make-tokenizer` (and `python launch/make_tokenizer.py`)."""
    main()
