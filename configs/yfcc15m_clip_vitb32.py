"""CLIP ViT-B/32 on YFCC-15M with the DeCLIP toolkit's recipe (shared/spec/OBJECTIVES.md A.2, A.7).

Reported (Sense-GVT/DeCLIP README, 32 epochs on DeCLIP's filtered YFCC-15M): ImageNet zero-shot
top-1 32.8.

Recipe: batch 4,096, 128,001 steps, AdamW (0.9, 0.98), eps 1e-8, weight decay 0.5, warm-up from
1e-4 to the peak 5e-4 over 2,500 steps then cosine, RandomResizedCrop scale 0.5-1.0, AltTexts only.
Weight decay and peak are those of the toolkit's SLIP/FILIP benchmark configs and the SLIP repo's
CLIP baseline (the notes do not quote the CLIP config itself); veclip_jax/recipes/declip.py says
what is and is not copied.

  python launch/train.py --config=configs/yfcc15m_clip_vitb32.py --workdir=/ckpt/yfcc_clip \
      --config.data.train_files='/data/yfcc15m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/train.py --config=configs/yfcc15m_clip_vitb32.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.declip import declip_config


def get_config(arg: str | None = None):
    return declip_config("clip", arg)
