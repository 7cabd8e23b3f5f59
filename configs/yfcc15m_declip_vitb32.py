"""DeCLIP ViT-B/32 on YFCC-15M: the DeCLIP toolkit's recipe (shared/spec/OBJECTIVES.md A.3).

loss = 0.4 multi-view CLIP (2 MoCoV2 views x {caption, EDA caption}) + 0.2 SimSiam (the two views)
+ 0.2 MLM (15 % of the caption tokens; the masked caption also gives the text embedding) + 0.2
nearest-neighbour supervision (each view against the neighbours of both captions in a FIFO queue
of 65,536 text embeddings, one queue for the job, part of the checkpoint). Batch 4,096, 128,001
steps, AdamW (0.9, 0.98), eps 1e-8, weight decay 0.1, warm-up from 1e-4 to the peak 1e-3 over
2,500 steps then cosine. AltTexts only.
Reported: ImageNet zero-shot top-1 43.2 (DeCLIP toolkit README, ViT-B/32, 32 epochs).

  python launch/train.py --config=configs/yfcc15m_declip_vitb32.py --workdir=/ckpt/yfcc_declip \
      --config.data.train_files='/data/yfcc15m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/train.py --config=configs/yfcc15m_declip_vitb32.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.declip import declip_config


def get_config(arg: str | None = None):
    return declip_config("declip", arg)
