"""FILIP ViT-B/32 on YFCC-15M: the DeCLIP toolkit's recipe (shared/spec/OBJECTIVES.md A.5).

Symmetric InfoNCE over token-wise late-interaction similarities (image patches x caption tokens,
max then mean, padding masked out), top-16 tokens per pair, a 256-d token space and its own
temperature; the pooled CLIP loss has weight 0 (logged only). View 1 of the MoCoV2 transform. Batch
4,096, 128,001 steps, AdamW (0.9, 0.98), eps 1e-8, weight decay 0.5, warm-up from 1e-4 to the peak
5e-4 over 2,500 steps then cosine; joint embedding 768. AltTexts only.
Reported: ImageNet zero-shot top-1 39.5 (DeCLIP toolkit README, ViT-B/32, 32 epochs; the toolkit
scores zero-shot with the token-wise similarity).
Export: the towers go to HF CLIPModel, but the token-wise similarity has no HF equivalent (the
exported config's notes say so).

  python launch/train.py --config=configs/yfcc15m_filip_vitb32.py --workdir=/ckpt/yfcc_filip \
      --config.data.train_files='/data/yfcc15m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/train.py --config=configs/yfcc15m_filip_vitb32.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.declip import declip_config


def get_config(arg: str | None = None):
    return declip_config("filip", arg)
