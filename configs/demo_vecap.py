"""configs/demo.py with data.vecap_prob = 1.0: VeCap captions only.

python launch/train.py --config=configs/demo_vecap.py --workdir=workdir/demo_vecap
make demo-table   # all three variants, then the README's table
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.data.vecap_prob = 1.0
    return c
