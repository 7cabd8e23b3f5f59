"""DeCLIP with ViT-B/32 on DeCLIP-88M (the DeCLIP paper's 88M image-text pairs).

Reported (Sense-GVT/DeCLIP README): ImageNet zero-shot top-1 66.2.

DeCLIP-88M's composition (YFCC-15M plus other open and web pairs) and its data were never
released, and its configs point only at the YFCC-15M list: this config requires the corpus as
config.data.sources (config.data.require_sources) and refuses to run without, naming the field.
Recipe: the toolkit's YFCC-15M DeCLIP config (configs/yfcc15m_declip_vitb32.py; its schedule,
128,001 steps of 4,096, is kept: the 88M schedule is not in the notes), CLIP's BPE tokenizer with
the mask token; target tpu-v5p-64.

  python launch/train.py --config=my_declip88m.py --workdir=/ckpt/declip88m_vitb32
      # my_declip88m.py: imports this config's get_config() and sets c.data.sources
  python launch/train.py --config=configs/declip88m_declip_vitb32.py:local --workdir=/tmp/local  # CPU
"""

from veclip_jax.recipes.declip import declip88m_config


def get_config(arg: str | None = None):
    return declip88m_config("vitb32", arg)
