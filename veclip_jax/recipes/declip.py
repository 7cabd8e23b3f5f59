"""The DeCLIP toolkit's YFCC-15M recipe (shared/spec/OBJECTIVES.md, part A) as configs, per objective.

`configs/yfcc15m_{clip,siglip,slip,declip,filip,defilip}_vitb32.py` call `declip_config(objective, arg)`,
`configs/yfcc15m_{clip,slip,declip,filip}_r50.py` `declip_config(objective, arg, tower="r50")`, and
`configs/declip88m_declip_{r50,vitb32}.py` `declip88m_config(tower, arg)`.
What the toolkit's configs set, and we copy (OBJECTIVES.md A.2, A.3; RESNET.md):

- towers: ViT-B/32 at 224 px, or CLIP's ModifiedResNet-50 (defaults.MODEL_SIZES["RN50"]:
  attention pooling to a 1,024-d embedding), and CLIP's text transformer (12
  layers, width 512, 8 heads, 77 positions), embedding 512 for the ViT;
- CLIP's BPE tokenizer (data.tokenizer="clip_bpe") with the toolkit's mask token:
  49,409 ids, end-of-text 49407, mask 49408;
- global batch 4,096 (128 per GPU x 32 GPUs), 128,001 iterations (~34 passes
  over 15.4M pairs; the README says "32 epochs");
- AdamW betas (0.9, 0.98), eps 1e-8; a linear warm-up from `base_lr` 1e-4
  to the peak over 2,500 steps, then cosine to 0;
- RandomResizedCrop scale 0.5-1.0 (the toolkit's STANDARD_SLIP view);
- YFCC-15M (DeCLIP's filtered 15,388,848 pairs) has AltTexts only: vecap_prob 0.

Per objective:
- CLIP: weight decay 0.5 and peak 5e-4. The notes give the toolkit's CLIP-benchmark
  optimizer only through its siblings: the SLIP and FILIP benchmark configs use
  wd 0.5 / peak 5e-4 (A.4, A.5), as does the original SLIP repo's CLIP
  baseline; DeCLIP itself uses wd 0.1 / peak 1e-3. Reported: ImageNet
  zero-shot top-1 32.8 (ViT-B/32, DeCLIP README, A.7).
- SigLIP: not in the toolkit. Its recipe is the toolkit's DeCLIP optimizer
  (wd 0.1, peak 1e-3, same warm-up, steps and batch) with the SigLIP paper's
  loss (temperature init log 10, bias init -10) — the paper's settings adapted
  to this recipe, not a recipe anybody has reported a YFCC-15M number for.
- SLIP (A.4): wd 0.5, peak 5e-4; CLIP on the standard crop + 1.0 x SimCLR
  (temperature 0.1, MLP 768 -> 4096 -> 4096 -> 256) on two MoCoV2 views
  (RRC 0.2-1, colour jitter 0.4/0.4/0.4/0.1 p 0.8, grey p 0.2, blur p 0.5,
  flip). Reported 34.3.
- DeCLIP (A.3): wd 0.1, peak 1e-3; two MoCoV2 views only; 0.4 multi-view
  CLIP + 0.2 SimSiam + 0.2 MLM (15 % of tokens) + 0.2 nearest-neighbour
  (queue of 65,536 text embeddings). Reported 43.2.
- FILIP (A.5): wd 0.5, peak 5e-4; view 1 of the MoCoV2 transform; the
  token-wise loss only (pooled CLIP weight 0), top-16 tokens, 256-d token
  space; joint embedding 768 (the toolkit's `embed_dim: 768`). Reported 39.5.
  Not copied: the toolkit trains FILIP on MLM-masked captions although the
  MLM weight is 0 (`text_mask_type: MLM`, a side effect, A.5).
- DeFILIP (A.6): DeCLIP's recipe + 0.2 x FILIP (view 1, masked caption).
  Reported 45.0.

ResNet-50 rows (RESNET.md; reported ImageNet zero-shot top-1, 32 epochs): CLIP
37.2, DeCLIP 44.4, SLIP 28.5, FILIP 21.3. The optimizer is the toolkit's CLIP
RN50 config's (peak 1e-3 from 1e-4 over 2,500 steps, weight decay 0.1, none on
BN/LN/biases/temperature), used for every RN50 objective: the notes quote no
other RN50 optimizer. BatchNorm statistics are the global batch's (the
toolkit's RN50 configs use per-GPU BN, `use_sync_bn: False`): the same update
on any mesh, and no gradient accumulation.

DeCLIP-88M (DeCLIP RN50 62.5, ViT-B/32 66.2): the DeCLIP recipe above on a
corpus whose composition was never released, so those configs require
data.sources (data.require_sources) and refuse to run without.

Not copied: the toolkit's ImageNet mean/std normalisation (ours is CLIP's), its
clamp of the log-temperature to [3, 6] before each step, and its loss-spike
rollback (A.1). `arg` "local" gives the local variant: the same objective and
code path with the tiny towers on the demo data, a few steps, on the CPU.
"""

from __future__ import annotations

import ml_collections

from veclip_jax import defaults
from veclip_jax.eval import registry
from veclip_jax.recipes.veclip import local_base, mesh_rules

BATCH_SIZE = 4_096
TOTAL_STEPS = 128_001
WARMUP_STEPS = 2_500
WARMUP_INIT_LR = 1e-4  # the toolkit's base_lr

# objective -> (peak learning rate, weight decay, reported ImageNet zero-shot top-1 or None)
RECIPES: dict[str, tuple[float, float, float | None]] = {
    "clip": (5e-4, 0.5, 32.8),
    "siglip": (1e-3, 0.1, None),
    "slip": (5e-4, 0.5, 34.3),
    "declip": (1e-3, 0.1, 43.2),
    "filip": (5e-4, 0.5, 39.5),
    "defilip": (1e-3, 0.1, 45.0),
}
# The ResNet-50 rows (RESNET.md): objective -> (peak, weight decay, reported top-1).
RECIPES_R50: dict[str, tuple[float, float, float | None]] = {
    "clip": (1e-3, 0.1, 37.2),
    "slip": (1e-3, 0.1, 28.5),
    "declip": (1e-3, 0.1, 44.4),
    "filip": (1e-3, 0.1, 21.3),
}
# DeCLIP-88M's reported ImageNet zero-shot top-1 per tower.
DECLIP88M = {"r50": 62.5, "vitb32": 66.2}
# tower -> (model size, its :local size, the recipe table)
TOWERS = {"vitb32": ("B/32", "tiny", RECIPES), "r50": ("RN50", "RN-tiny", RECIPES_R50)}
# CLIP's BPE with the toolkit's mask token (49,408 + 1 ids), as every toolkit config tokenizes.
BPE_VOCAB = 49_409

# objective -> augmented views per image (data.augment.views); the others read the standard crop only.
VIEWS = {"slip": 2, "declip": 2, "filip": 1, "defilip": 2}


def _objective_fields(c: ml_collections.ConfigDict, objective: str) -> None:
    """What the objective changes in a config beyond the optimizer: its views (and FILIP's embedding)."""
    c.objective.name = objective
    if objective in VIEWS:
        c.data.augment.views = VIEWS[objective]


def resnet_mesh_rules() -> tuple:
    """The hardware rules of the RN50 configs: data parallel (38M + 64M parameters fit every chip;
    BatchNorm wants whole examples per device), bfloat16."""
    rule = {"mesh.data": -1, "mesh.fsdp": 1, "model.dtype": "bfloat16"}
    return ((r"tpu-.*", rule), (r"gpu-.*", rule))


def declip_config(objective: str, arg: str | None = None, tower: str = "vitb32") -> ml_collections.ConfigDict:
    """The YFCC-15M config for `objective` (a key of the tower's recipe table) on `tower` ("vitb32",
    "r50"); `arg` "local": its local variant."""
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/yfcc15m_{objective}_{tower}.py:{arg}: the only variant is :local")
    size, _, recipes = TOWERS[tower]
    peak, weight_decay, _ = recipes[objective]
    if arg == "local":
        return local_variant(objective, tower)
    c = defaults.get_config(size)
    _objective_fields(c, objective)
    c.data.tokenizer = "clip_bpe"
    c.model.text.update(vocab_size=BPE_VOCAB, eos_id=49_407)
    if objective == "filip" and tower == "vitb32":
        c.model.embed_dim = 768  # the toolkit's FILIP config (embed_dim: 768)
    c.batch_size = BATCH_SIZE
    c.total_steps = TOTAL_STEPS
    c.log_every = 100
    c.checkpoint_every = 1000
    c.eval_every = 5000
    c.eval_batch_size = 4096
    c.optim.update(
        learning_rate=peak,
        warmup_steps=WARMUP_STEPS,
        warmup_init_lr=WARMUP_INIT_LR,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        weight_decay=weight_decay,
    )
    if tower == "r50":
        c.mesh_rules = resnet_mesh_rules()
        c.hardware = "tpu-v5p-64"  # 32 chips x 128 images: the toolkit's 32 GPUs x 128
    else:
        c.mesh_rules = mesh_rules("B/32")
    c.data.allow_demo = False
    c.data.vecap_prob = 0.0  # YFCC-15M: AltTexts only
    c.data.crop_scale = (0.5, 1.0)
    c.data.num_workers = 8
    c.data.num_threads = 2
    c.evals = {"imagenet": registry.standard_task("imagenet") | dict(data_dir="~/tensorflow_datasets")}
    return c


# The objectives' heads and queue scaled to the tiny towers (width 64, 16 patches, 32 tokens), for
# the :local variants and the demo (configs/demo.py:OBJECTIVE): the toolkit's sizes (defaults.py)
# are made for ViT-B/32, and a 4,096-wide MLP would dwarf the tiny towers.
TINY_HEADS: dict[str, dict[str, int]] = {
    "slip": dict(mlp_dim=256, ssl_dim=64),
    "declip": dict(proj_dim=128, pred_dim=64, queue_size=4096),
    "filip": dict(token_dim=32, top_k=5),
    "defilip": dict(proj_dim=128, pred_dim=64, queue_size=4096, token_dim=32, top_k=5),
}


def tiny_objective(c: ml_collections.ConfigDict, objective: str) -> None:
    """Sets `objective` on a tiny-tower config: its views and its heads at TINY_HEADS' sizes."""
    _objective_fields(c, objective)
    if objective in TINY_HEADS:
        c.objective[objective].update(TINY_HEADS[objective])


def declip88m_config(tower: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """DeCLIP on DeCLIP-88M with `tower` ("r50", "vitb32"): the YFCC-15M DeCLIP recipe; the corpus
    (never released) must be given as data.sources."""
    c = declip_config("declip", arg, tower)
    if arg != "local":
        c.data.require_sources = True
        c.hardware = "tpu-v5p-64"
    return c


def local_variant(objective: str, tower: str = "vitb32") -> ml_collections.ConfigDict:
    """The objective's code path on a CPU: tiny towers, the demo data's AltTexts, a few steps."""
    size, local_size, recipes = TOWERS[tower]
    peak, weight_decay, _ = recipes[objective]
    c = local_base(size)
    if local_size != "tiny":
        c.model = defaults.model_config(local_size)
        c.mesh_rules = resnet_mesh_rules()
    tiny_objective(c, objective)
    c.optim.update(warmup_init_lr=min(WARMUP_INIT_LR, peak), learning_rate=peak)
    c.optim.update(b1=0.9, b2=0.98, eps=1e-8, weight_decay=weight_decay)
    c.data.vecap_prob = 0.0
    c.data.crop_scale = (0.5, 1.0)
    return c
