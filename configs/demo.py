"""The README's main job: VeCLIP's caption mixing on the embedded demo data (2 CPU cores).

  python launch/train.py --config=configs/demo.py --workdir=workdir/demo   # or: make demo
  python launch/train.py --config=configs/demo.py:alttext --workdir=workdir/demo_alttext

The tiny towers (2 layers, width 64, 32 px crops of the 64 px demo images)
trained for 2,000 steps of 64 pairs on the demo's 4,096 coloured-shape images,
each text drawn per visit from the AltText or the VeCap caption with
probability 0.5 (VeCLIP's mixed training). The arg picks the caption mix:
`mixed` (the default, data.vecap_prob=0.5), `alttext` (0: the CLIP baseline)
or `vecap` (1: VeCap only); `make demo-table` trains all three. Evaluated on
the 512 held-out images: zero-shot top-1 per attribute (colour, shape, size,
position, background) with the prompt templates of veclip_jax/defaults.py,
and image<->text retrieval with their VeCap captions. The README's demo table
gives the measured numbers and the time (about 4 minutes of training on 2 cores).

The arg may instead name an objective (`siglip`, `slip`, `declip`, `filip`,
`defilip`): the same run (mixed captions, steps, data, seed) with that
objective, its heads scaled to the tiny towers (veclip_jax/recipes/declip.py
TINY_HEADS); the README's objectives table.
"""

from veclip_jax import defaults
from veclip_jax.recipes.declip import tiny_objective

VECAP_PROB = {"mixed": 0.5, "alttext": 0.0, "vecap": 1.0}
OBJECTIVES = ("siglip", "slip", "declip", "filip", "defilip")


def get_config(mix: str = "mixed"):
    objective = mix if mix in OBJECTIVES else None
    if objective:
        mix = "mixed"
    if mix not in VECAP_PROB:
        raise ValueError(
            f"configs/demo.py:{mix}: the arg is a mix, one of {sorted(VECAP_PROB)}, or an objective, "
            f"one of {list(OBJECTIVES)}"
        )
    c = defaults.get_config("tiny")
    if objective:
        tiny_objective(c, objective)
    c.batch_size = 64
    c.total_steps = 2000
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 500
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.data.vecap_prob = VECAP_PROB[mix]
    return c
