"""configs/demo.py with data.vecap_prob = 0.5: the VeCLIP mix (the same as configs/demo.py).

python launch/train.py --config=configs/demo_mixed.py --workdir=workdir/demo_mixed
make demo-table   # all three variants, then the README's table
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.data.vecap_prob = 0.5
    return c
