"""Every default (veclip_jax/defaults.py), as an experiment file; the arg picks the towers.

  python launch/train.py --config=configs/base.py --workdir=/tmp/base        # the tiny towers, demo data
  python launch/train.py --config=configs/base.py:B/16 --workdir=/ckpt/b16   # tiny, B/16, L/14 or H/14
"""

from veclip_jax import defaults


def get_config(size: str | None = None):
    return defaults.get_config(size)
