"""SLIP ViT-B/32 on YFCC-15M: the DeCLIP toolkit's recipe (shared/spec/OBJECTIVES.md A.4).

CLIP on the standard crop (RandomResizedCrop 0.5-1) plus 1.0 x SimCLR (NT-Xent, temperature 0.1,
negatives over the global batch) on two MoCoV2 views through an MLP head 768 -> 4096 -> 4096 -> 256
on the pre-projection class token. Batch 4,096, 128,001 steps, AdamW (0.9, 0.98), eps 1e-8, weight
decay 0.5, warm-up from 1e-4 to the peak 5e-4 over 2,500 steps then cosine. AltTexts only.
Reported: ImageNet zero-shot top-1 34.3 (DeCLIP toolkit README, ViT-B/32, 32 epochs).

  python launch/train.py --config=configs/yfcc15m_slip_vitb32.py --workdir=/ckpt/yfcc_slip \
      --config.data.train_files='/data/yfcc15m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/train.py --config=configs/yfcc15m_slip_vitb32.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.declip import declip_config


def get_config(arg: str | None = None):
    return declip_config("slip", arg)
