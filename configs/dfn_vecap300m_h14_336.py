"""DFN + VeCap 300M (336 px), VeCap-DFN-H/14: a row of the VeCLIP paper's table, H/14 at 336 px.

Reported (the released checkpoints, apple/ml-veclip README):
COCO R@1 I2T 72.78 / T2I 52.33, Flickr30k R@1 I2T 93.60 / T2I 82.64, ImageNet top-1 83.07,
ImageNet-V2 76.37.

Data: DFN + VeCap-300M (2,300M pairs); text: two corpora mixed by weight (data.sources): DFN
(AltTexts only) and VeCap 300M (VeCLIP's 0.5 mix), 0.5 / 0.5 (fallback: the paper's weights are
unknown).
Samples seen 4,096M = 125,000 steps x global batch 32,768.
Written for tpu-v5p-1024 (512 chips); config.mesh_rules pick the mesh, remat and dtype for
other pods and for H100 clusters. Compiled memory per chip: README "Reproduce the paper".
Fallback recipe, not from the paper (its appendix could not be read): AdamW, lr 5e-4, 2k warm-up,
cosine, wd 0.2, samples seen and batch above; veclip_jax/recipes/veclip.py says which settings.

  python launch/train.py --config=configs/dfn_vecap300m_h14_336.py --workdir=gs://BUCKET/run \
      --config.data.sources.dfn.files='/data/dfn/{00000..99999}.tar' \
      --config.data.sources.vecap300m.files='/data/vecap300m/train-*.array_record' \
      --config.data.tokenizer=/data/t5/spiece.model
  python launch/compile.py --config=configs/dfn_vecap300m_h14_336.py        # memory per chip, no pod needed
  python launch/train.py --config=configs/dfn_vecap300m_h14_336.py:local --workdir=/tmp/local  # CPU, demo
"""

from veclip_jax.recipes.veclip import paper_config


def get_config(arg: str | None = None):
    return paper_config("dfn_vecap300m_h14_336", arg)
