"""Convert raw image-text pairs into ArrayRecord shards (veclip_jax/cli/make_dataset.py):
python launch/make_dataset.py --webdataset='/data/{00000..00331}.tar' --out=/data/train --num_shards=166"""

from veclip_jax.cli.make_dataset import run

if __name__ == "__main__":
    run()
