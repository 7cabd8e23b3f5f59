"""SigLIP ViT-B/32 on YFCC-15M: the DeCLIP toolkit's recipe with the SigLIP paper's loss.

Recipe source: SigLIP is not in the DeCLIP toolkit. This is the SigLIP paper's sigmoid loss
(Zhai et al. 2023: learnable temperature initialised at log 10, learnable bias at -10) adapted to
the toolkit's DeCLIP optimizer recipe (shared/spec/OBJECTIVES.md A.3): batch 4,096, 128,001 steps,
AdamW (0.9, 0.98), eps 1e-8, weight decay 0.1, warm-up from 1e-4 to the peak 1e-3 over 2,500 steps
then cosine, RandomResizedCrop scale 0.5-1.0, AltTexts only. No result has been reported for this
recipe; compare with configs/yfcc15m_clip_vitb32.py (CLIP, reported 32.8 ImageNet zero-shot).

  python launch/train.py --config=configs/yfcc15m_siglip_vitb32.py --workdir=/ckpt/yfcc_siglip \
      --config.data.train_files='/data/yfcc15m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/train.py --config=configs/yfcc15m_siglip_vitb32.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.declip import declip_config


def get_config(arg: str | None = None):
    return declip_config("siglip", arg)
