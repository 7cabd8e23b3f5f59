"""Train a sentencepiece tokenizer on shards' captions (veclip_jax/cli/make_tokenizer.py):
python launch/make_tokenizer.py --input='/data/train-*.array_record' --out=/data/spiece.model"""

from veclip_jax.cli.make_tokenizer import run

if __name__ == "__main__":
    run()
