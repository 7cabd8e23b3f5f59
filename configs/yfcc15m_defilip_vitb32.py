"""DeFILIP ViT-B/32 on YFCC-15M: the DeCLIP toolkit's recipe (shared/spec/OBJECTIVES.md A.6).

Every DeCLIP term (0.4 multi-view CLIP, 0.2 SimSiam, 0.2 MLM, 0.2 nearest-neighbour) plus 0.2 x
FILIP's token-wise loss between view 1 and the masked caption (weights sum to 1.2, as in the
toolkit). DeCLIP's optimizer: batch 4,096, 128,001 steps, AdamW (0.9, 0.98), eps 1e-8, weight
decay 0.1, warm-up from 1e-4 to the peak 1e-3 over 2,500 steps then cosine. AltTexts only.
Reported: ImageNet zero-shot top-1 45.0 (DeCLIP toolkit README, ViT-B/32, 32 epochs).

  python launch/train.py --config=configs/yfcc15m_defilip_vitb32.py --workdir=/ckpt/yfcc_defilip \
      --config.data.train_files='/data/yfcc15m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/train.py --config=configs/yfcc15m_defilip_vitb32.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.declip import declip_config


def get_config(arg: str | None = None):
    return declip_config("defilip", arg)
