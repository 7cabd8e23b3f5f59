"""The experiment builders: published recipes as configs, one module per source.

`configs/*.py` (the experiment files) are one-liners over these, so a recipe's numbers live in one
place and are pinned by tests/golden_configs:

  veclip.py   the VeCLIP paper's table (`paper_config`, `RUNS`), the mesh rules of the paper's
              towers per accelerator, and the `:local` base every recipe's CPU variant shares
  declip.py   the DeCLIP toolkit's YFCC-15M recipe per objective (`declip_config`), and the
              objectives' heads scaled to the tiny towers (`tiny_objective`, for the demo)

Library code never imports these (only experiment files and tests do): a recipe is an experiment,
not a default (the defaults are veclip_jax/defaults.py).
"""
