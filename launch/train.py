"""Train a CLIP model (veclip_jax/cli/train.py):
python launch/train.py --config=configs/demo.py --workdir=DIR"""

from veclip_jax.cli.train import run

if __name__ == "__main__":
    run()
