"""configs/demo.py with data.vecap_prob = 0.0: AltText only (the CLIP baseline of the paper's tables).

python launch/train.py --config=configs/demo_alttext.py --workdir=workdir/demo_alttext
make demo-table   # all three variants, then the README's table
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.data.vecap_prob = 0.0
    return c
