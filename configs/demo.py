"""The README's main job: VeCLIP's caption mixing on the embedded demo data (2 CPU cores).

  python launch/train.py --config=configs/demo.py --workdir=workdir/demo   # or: make demo

The tiny towers (2 layers, width 64, 32 px crops of the 64 px demo images)
trained for 2,000 steps of 64 pairs on the demo's 4,096 coloured-shape images,
each text drawn per visit from the AltText or the VeCap caption with
probability 0.5 (VeCLIP's mixed training; configs/demo_alttext.py and
configs/demo_vecap.py are the 0 and 1 ends). Evaluated on the 512 held-out
images: zero-shot top-1 per attribute (colour, shape, size, position,
background) with the prompt templates of configs/base.py, and image<->text
retrieval with their VeCap captions. The README's demo table gives the
measured numbers and the time (about 4 minutes of training on 2 cores).
"""

from configs import base


def get_config():
    c = base.get_config("tiny")
    c.batch_size = 64
    c.total_steps = 2000
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 500
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.data.vecap_prob = 0.5
    return c
