"""FILIP with CLIP's ModifiedResNet-50 on YFCC-15M, the DeCLIP toolkit's recipe (shared/spec/RESNET.md).

Reported (Sense-GVT/DeCLIP README, RN50, 32 epochs on DeCLIP's filtered YFCC-15M): ImageNet
zero-shot top-1 21.3.

Recipe: batch 4,096 (the toolkit's 128 per GPU x 32 GPUs; here tpu-v5p-64, 32 chips x 128),
128,001 steps, AdamW (0.9, 0.98), eps 1e-8, weight decay 0.1 (none on BN, LN, biases, temperature),
warm-up from 1e-4 to the peak 1e-3 over 2,500 steps then cosine, 224 px, CLIP's BPE tokenizer with
the toolkit's mask token (49,409 ids), AltTexts only. BatchNorm statistics over the global batch
(the toolkit's are per GPU); no gradient accumulation. veclip_jax/recipes/declip.py says what is
and is not copied.

  python launch/train.py --config=configs/yfcc15m_filip_r50.py --workdir=/ckpt/yfcc_filip_r50 \
      --config.data.train_files='/data/yfcc15m/train-*.array_record'
  python launch/train.py --config=configs/yfcc15m_filip_r50.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.declip import declip_config


def get_config(arg: str | None = None):
    return declip_config("filip", arg, tower="r50")
