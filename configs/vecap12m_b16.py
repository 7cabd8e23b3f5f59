"""VeCap 12M, VeCLIP-B/16: a row of the VeCLIP paper's table, B/16 at 224 px.

Reported (the released checkpoints, apple/ml-veclip README):
COCO R@1 I2T 47.78 / T2I 31.62, Flickr30k R@1 I2T 73.90 / T2I 55.68, ImageNet top-1 38.11,
ImageNet-V2 32.53.

Data: VeCap-12M (12M pairs); text: AltText or VeCap with probability 0.5 per visit (VeCLIP's mixed
training).
Samples seen 384M = 46,875 steps x global batch 8,192.
Written for tpu-v5p-64 (32 chips); config.mesh_rules pick the mesh, remat and dtype for
other pods and for H100 clusters. Compiled memory per chip: README "Reproduce the paper".
Fallback recipe, not from the paper (its appendix could not be read): AdamW, lr 5e-4, 2k warm-up,
cosine, wd 0.2, samples seen and batch above; veclip_jax/recipes/veclip.py says which settings.

  python launch/train.py --config=configs/vecap12m_b16.py --workdir=gs://BUCKET/run \
      --config.data.train_files='/data/vecap12m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/compile.py --config=configs/vecap12m_b16.py        # memory per chip, no pod needed
  python launch/train.py --config=configs/vecap12m_b16.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.veclip import paper_config


def get_config(arg: str | None = None):
    return paper_config("vecap12m_b16", arg)
