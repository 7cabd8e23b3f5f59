"""VeCap 300M, VeCap-DFN-B/16: a row of the VeCLIP paper's table, B/16 at 224 px.

Reported (the released checkpoints, apple/ml-veclip README):
COCO R@1 I2T 64.74 / T2I 44.58, Flickr30k R@1 I2T 90.10 / T2I 73.14, ImageNet top-1 46.43,
ImageNet-V2 41.15.

Data: VeCap-300M (300M pairs); text: AltText or VeCap with probability 0.5 per visit (VeCLIP's mixed
training).
Samples seen 2,048M = 62,500 steps x global batch 32,768.
Written for tpu-v5p-256 (128 chips); config.mesh_rules pick the mesh, remat and dtype for
other pods and for H100 clusters. Compiled memory per chip: README "Reproduce the paper".
Fallback recipe, not from the paper (its appendix could not be read): AdamW, lr 5e-4, 2k warm-up,
cosine, wd 0.2, samples seen and batch above; veclip_jax/recipes/veclip.py says which settings.

  python launch/train.py --config=configs/vecap300m_b16.py --workdir=gs://BUCKET/run \
      --config.data.train_files='/data/vecap300m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/compile.py --config=configs/vecap300m_b16.py        # memory per chip, no pod needed
  python launch/train.py --config=configs/vecap300m_b16.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.veclip import paper_config


def get_config(arg: str | None = None):
    return paper_config("vecap300m_b16", arg)
