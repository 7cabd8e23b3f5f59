"""Every default of veclip-jax, documented: the schema every config is checked against.

Experiment files (`configs/*.py`) start from `get_config()` and change what
differs (`config.model = model_config("B/16")`, `config.data.vecap_prob = 0.5`);
`veclip_jax/config.py` refuses any field that is not here, or of another type.

  python launch/train.py --config=configs/base.py         (these defaults: the tiny model, demo data)
  python launch/train.py --config=configs/base.py:B/16    (another of MODEL_SIZES)

Override any field on the command line: --config.batch_size=1024.
Training recipe defaults follow the fallback in shared/spec/VECLIP.md (an
OpenCLIP-style recipe), *not* the paper's appendix, which could not be read.
"""

from __future__ import annotations

import math

import ml_collections

from veclip_jax.objective_fields import FIELDS, config_fields
from veclip_jax.parallel.axes import BATCH_AXES  # the mesh's axis names live in parallel/

# CLIP's image statistics (OpenAI's, on [0, 1] pixels): model.vision.image_mean / image_std. Written
# out here (this module imports no image library); tests/test_uint8_images.py checks that they are
# data/image_ops.py's CLIP_MEAN / CLIP_STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The towers. B/16 and H/14 are the released VeCLIP checkpoints' sizes (their
# config.json); L/14 is OpenAI's L/14 shape (inferred, see VECLIP.md). All use
# quick_gelu, LayerNorm eps 1e-5, 77 text positions and T5's 32,100-id
# sentencepiece vocabulary (pad 0, end-of-text 1). `tiny` is for tests on a CPU.
MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(
        vision=dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256),
        text=dict(vocab_size=1024, context_length=32, width=64, layers=2, heads=4, mlp_dim=256),
        embed_dim=32,
    ),
    "B/16": dict(
        vision=dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072),
        text=dict(vocab_size=32100, context_length=77, width=512, layers=12, heads=8, mlp_dim=2048),
        embed_dim=512,
    ),
    "L/14": dict(
        vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
        text=dict(vocab_size=32100, context_length=77, width=768, layers=12, heads=12, mlp_dim=3072),
        embed_dim=768,
    ),
    "H/14": dict(
        vision=dict(image_size=336, patch_size=14, width=1280, layers=32, heads=16, mlp_dim=5120),
        text=dict(vocab_size=32100, context_length=77, width=1024, layers=24, heads=16, mlp_dim=4096),
        embed_dim=1024,
    ),
    # The DeCLIP toolkit's ViT-B/32 (OBJECTIVES.md A.2): its text tower is CLIP's (12 layers, width
    # 512, 8 heads, 77 positions). Vocabulary: T5's 32,100 like the others, because the tokenizer we
    # ship and load is sentencepiece; the toolkit's BPE (49,409 ids) would need its own tokenizer.
    "B/32": dict(
        vision=dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072),
        text=dict(vocab_size=32100, context_length=77, width=512, layers=12, heads=8, mlp_dim=2048),
        embed_dim=512,
    ),
    # CLIP's ModifiedResNets (shared/spec/RESNET.md; open_clip's model configs): vision.width is the
    # stem's, resnet_layers the bottlenecks per stage, heads the attention pool's (width * 32 / 64);
    # patch_size is the tower's total stride (32); layers and mlp_dim are the ViT's (unused: 0). Text:
    # CLIP's BPE vocabulary (data.tokenizer="clip_bpe"; end-of-text 49407, pad 0).
    **{
        name: dict(
            vision=dict(
                type="resnet", resnet_layers=layers, image_size=size, patch_size=32, width=w,
                layers=0, heads=w // 2, mlp_dim=0,
            ),
            text=dict(vocab_size=49408, context_length=77, width=tw, layers=12, heads=tw // 64,
                      mlp_dim=4 * tw, eos_id=49407),
            embed_dim=embed,
        )  # fmt: skip
        for name, layers, w, size, embed, tw in (
            ("RN50", (3, 4, 6, 3), 64, 224, 1024, 512),
            ("RN101", (3, 4, 23, 3), 64, 224, 512, 512),
            ("RN50x4", (4, 6, 10, 6), 80, 288, 640, 640),
            ("RN50x16", (6, 8, 18, 8), 96, 384, 768, 768),
            ("RN50x64", (3, 15, 36, 10), 128, 448, 1024, 1024),
        )
    },
    # A ResNet for tests and the :local variants on a CPU: every stage, the scanned blocks of stage 1,
    # BatchNorm and the attention pool at 64 px, with the tiny text tower (demo tokenizer).
    "RN-tiny": dict(
        vision=dict(
            type="resnet", resnet_layers=(2, 1, 1, 1), image_size=64, patch_size=32, width=8,
            layers=0, heads=4, mlp_dim=0,
        ),
        text=dict(vocab_size=1024, context_length=32, width=64, layers=2, heads=4, mlp_dim=256),
        embed_dim=32,
    ),  # fmt: skip
}


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
    """The model section for one of MODEL_SIZES, with the shared defaults."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model size {size!r} is not one of {sorted(MODEL_SIZES)}")
    s = MODEL_SIZES[size]
    return ml_collections.ConfigDict(
        dict(
            size=size,  # informative only; the fields below are what is built
            # type: the image tower, "vit" (models/vit.py) or "resnet" (CLIP's ModifiedResNet,
            # models/resnet.py: BatchNorm, so no gradient accumulation); resnet_layers: its stages.
            # image_mean / image_std: the statistics (of [0, 1] pixels) the vision tower normalises its
            # uint8 (or 0-255 float) pixels with, inside the jitted step (models/clip.py
            # `normalize_pixels`); CLIP's (OpenAI), = data/image_ops.py CLIP_MEAN / CLIP_STD. An
            # imported HF / open_clip model carries its preprocessor's.
            vision=dict(
                dict(type="vit", resnet_layers=(0, 0, 0, 0), image_mean=CLIP_MEAN, image_std=CLIP_STD),
                **s["vision"],
            ),
            # pad 0, end-of-text 1: T5 sentencepiece convention (CLIP's BPE: 49407). mask_id: the id
            # that masked-language modelling (DeCLIP's "tokens_mlm") puts in place of a token; -1 =
            # the first id past the tokenizer's pieces (its vocab_size), which must still be < vocab_size.
            text=dict(dict(pad_id=0, eos_id=1, mask_id=-1), **s["text"]),
            embed_dim=s["embed_dim"],
            act="quick_gelu",  # "quick_gelu" (OpenAI CLIP, VeCLIP) or "gelu" (exact erf)
            layer_norm_eps=1e-5,  # HF CLIP's; flax's own default is 1e-6
            dtype="float32",  # compute dtype: "float32" or "bfloat16"; parameters stay float32
            # Rematerialisation of each block in the backward pass: "none", "full",
            # "dots" (keep matmul outputs), "dots_no_batch" (veclip_jax/models/layers.py).
            remat="none",
            attention="auto",  # "auto" (cuDNN flash attention on GPU in bf16, else XLA), "xla", "cudnn"
            logit_scale_init=math.log(1 / 0.07),
            logit_scale_max=100.0,  # exp(logit_scale) is clipped here
        )
    )


# Logical axis name -> mesh axes (None: not split). Models only name axes; this decides
# (veclip_jax/parallel/rules.py). The default:
# - batch: the examples, over data x fsdp (every device holds a slice; fixed: the loss relies on it).
# - queue: the rows of DeCLIP's text queue, like the examples.
# - embed: the width of *parameters* (so of optimizer state) over fsdp; XLA gathers a layer's
#   weights when it needs them (ZeRO-3).
# - heads, mlp, vocab: over tensor (Megatron-style splits); act_mlp follows its weights.
# - act_embed: the width of *activations*, whole, so a batch sharded over fsdp is not re-split.
SHARDING_RULES = (
    ("batch", BATCH_AXES),
    ("queue", BATCH_AXES),  # the rows of an objective's queue (DeCLIP's text embeddings)
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_mlp", "tensor"),
    ("act_embed", None),
    ("length", None),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("positions", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("proj", None),
    ("conv_in", None),  # ResNet kernels HWIO (models/resnet.py): input channels whole,
    ("conv_out", "fsdp"),  # output channels over fsdp (RN50's stem has 32: fsdp <= 32 there)
)

# The fields of one entry of config.data.sources (veclip_jax/data/sources.py), with their defaults.
SOURCE_FIELDS: dict[str, object] = dict(
    files="",  # path spec, as data.train_files; one format per source (.array_record, .tar, .parquet)
    weight=1.0,  # sampling weight in the mixture (> 0; normalised over the sources)
    vecap_prob=-1.0,  # P(VeCap caption) for this source; -1 = data.vecap_prob
    # Where the captions and the image are; "" = the format's default, "none" = not used.
    # ArrayRecord: alt_text / vecap_text. Tar: a member extension ("txt") or "json:KEY" (a key
    # of the .json member). Parquet: a column name.
    alt_text_field="",  # default: alt_text / txt (else json:caption) / caption
    vecap_text_field="",  # default: vecap_text / none / none
    image_field="",  # default: jpeg / the first of jpg, jpeg, png, webp / the first such column or image
)


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
    """All defaults; `size` (e.g. `--config=configs/base.py:B/16`) picks the towers."""
    c = ml_collections.ConfigDict(_run())
    c.model = model_config(size or "tiny")
    c.update(_parallel())
    c.optim = _optim()
    c.objective = _objective()
    c.data = _data()
    c.update(_evals())
    return c


def _run() -> dict:
    """The run: seed, length, logging, checkpoints, what to start from."""
    return dict(
        seed=0,  # the one seed: initialisation, shuffling, crops and caption draws derive from it
        batch_size=64,  # global, over all devices and hosts
        total_steps=200,  # optimizer steps (batches) of the whole run, resumes included
        log_every=10,  # a metrics.jsonl line, TensorBoard point and console line every N steps
        eval_every=100,  # run config.evals every N steps (an entry may set its own) and at the end; 0 = never
        # An evaluation that fails (an undecodable image, a full disk) is logged and counted
        # (eval_failures), and training goes on; True stops the run instead (after the step's save).
        stop_on_eval_error=False,
        checkpoint_every=100,  # save every N steps; the last step and SIGTERM always save; 0 = only those
        keep_checkpoints=3,  # the newest N checkpoints are kept
        async_checkpointing=True,  # write checkpoints in the background while training goes on
        max_nonfinite_steps=10,  # this many skipped (non-finite) steps in a row stop the run
        # Parameters to start from (optimizer and data start fresh): a workdir or
        # Orbax checkpoint directory of ours (its latest step, or DIR/checkpoints/STEP),
        # or a HuggingFace CLIP directory. "" = random initialisation.
        init_from="",
    )


def _parallel() -> dict:
    """The device mesh, the sharding rules, the hardware and its mesh rules (veclip_jax/parallel/)."""
    return dict(
        # Device mesh: axis sizes; -1 takes the devices the others leave. The batch
        # is split over data x fsdp; fsdp also shards parameters and optimizer
        # state; tensor splits heads and MLP (veclip_jax/parallel/rules.py).
        # slices: TPU slices joined over the data-center network (multislice); the data axis spans
        # them (data must be a multiple of slices). Set from config.hardware.
        mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, slices=1)),
        # Logical axis -> mesh axes (veclip_jax/parallel/rules.py): models name axes, this decides.
        sharding_rules=SHARDING_RULES,
        # What the run is meant for (veclip_jax/parallel/hardware.py): "tpu-v5p-256", "tpu-v5p-256-2"
        # (two slices), "gpu-h100-32", or "" (whatever devices there are). Training checks the devices
        # match; the first of mesh_rules whose regex matches it sets its fields.
        hardware="",
        # (regex over config.hardware, {dotted field: value}) pairs, first match wins, e.g.
        # ("tpu-v5p-.*", {"mesh.fsdp": -1, "mesh.data": 1, "model.remat": "dots"}).
        mesh_rules=(),
    )


def _optim() -> ml_collections.ConfigDict:
    """The optimizer (AdamW) and its schedule (linear warm-up, cosine decay)."""
    return ml_collections.ConfigDict(
        dict(
            learning_rate=5e-4,  # peak
            warmup_steps=20,
            warmup_init_lr=0.0,  # the learning rate the linear warm-up starts from (DeCLIP's base_lr)
            end_lr_ratio=0.0,  # cosine floor, as a fraction of the peak
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            weight_decay=0.2,  # decoupled; not on biases, norms, class token, positions, logit scale
            grad_clip_norm=1.0,  # global norm; 0 disables
            grad_accum_steps=1,  # micro-batches per step; exact for the contrastive loss
        )
    )


def _objective() -> ml_collections.ConfigDict:
    """The training objective (veclip_jax/objectives/): what the train step differentiates.

    name: "clip" (symmetric InfoNCE), "siglip" (pairwise sigmoid loss, Zhai et
    al. 2023), "slip", "declip", "filip", "defilip" (the DeCLIP toolkit's,
    shared/spec/OBJECTIVES.md). Each objective's own fields sit in its
    sub-section, generated from its dataclass's fields, documented there
    (veclip_jax/objective_fields.py; the defaults are the toolkit's YFCC-15M
    ViT-B/32 settings); only the chosen one's are read. Objectives with image
    views take data.augment.views of them (SLIP, DeCLIP, DeFILIP: 2; FILIP: 1).
    """
    return ml_collections.ConfigDict(dict(name="clip", **{name: config_fields(name) for name in FIELDS}))


def _data() -> ml_collections.ConfigDict:
    """The training data: sources, tokenizer, caption choice, crops, augmentations, readers."""
    return ml_collections.ConfigDict(
        dict(
            # One source: ArrayRecord shards, WebDataset tars or Parquet files (format from the
            # extension): comma-separated paths, {000..127} ranges, globs; "" = demo data (or `sources`)
            train_files="",
            tokenizer="",  # sentencepiece model; "" = the demo data's
            # With no train_files / sources: train on the generated demo data. Paper configs set
            # False, so a run given no data is refused instead of silently training on the demo.
            allow_demo=True,
            # A corpus that must be a mixture (data.sources), e.g. DeCLIP-88M's, whose composition
            # was never released: such a config refuses data.train_files alone, naming the field.
            require_sources=False,
            cache_dir="~/.cache/veclip_jax",  # where the demo data is generated once
            vecap_prob=0.5,  # P(VeCap caption) per example per epoch; 0 = AltText only (CLIP)
            max_bad_fraction=0.01,  # more skipped records than this in a window is an error
            bad_window=1000,  # records per window for max_bad_fraction
            crop_scale=(0.9, 1.0),  # RandomResizedCrop area range (open_clip's default)
            crop_ratio=(3 / 4, 4 / 3),  # RandomResizedCrop aspect range
            decoder="simplejpeg",  # "simplejpeg" (falls back to PIL when absent) or "pil"
            # The crop's resize: "torch" (SIMD, box rounded to whole decoded pixels) or "pil"
            # (sub-pixel box, 3x slower); data/image_ops.py's docstring
            resize_backend="torch",
            num_workers=0,  # worker processes (grain mp_prefetch); 0 = threads in this process
            num_threads=4,  # reader threads per process
            prefetch=4,  # batches buffered ahead
            # Several corpora mixed by weight, instead of train_files: name -> a dict of
            # SOURCE_FIELDS (below), e.g. {"dfn": dict(files="/data/dfn/*.tar", weight=0.5), ...}
            sources=ml_collections.ConfigDict(),
            shuffle_buffer=1000,  # tar/Parquet sources: samples per shuffle window of each reader
            # The extra inputs of the SLIP / DeCLIP / FILIP objectives, made only when the objective
            # asks for them (data/augment.py, data/text_augment.py). Defaults: MoCo v2's views and
            # DeCLIP's EDA and masking, as in the DeCLIP toolkit.
            augment=dict(
                views=2,  # "views": augmented views per image, 1 or 2
                view_crop_scale=(0.2, 1.0),  # a view's RandomResizedCrop area range (aspect: crop_ratio)
                color_jitter=(0.4, 0.4, 0.4, 0.1),  # brightness, contrast, saturation, hue (torchvision)
                color_jitter_prob=0.8,  # P(a view is colour-jittered)
                grayscale_prob=0.2,  # P(a view is turned to gray)
                blur_prob=0.5,  # P(a view is blurred)
                blur_sigma=(0.1, 2.0),  # Gaussian blur sigma range, in output pixels
                flip_prob=0.5,  # P(a view is mirrored left-right)
                eda_alpha=0.1,  # "tokens_eda": fraction of a caption's words one EDA operation changes (>= 1)
                mlm_prob=0.15,  # "tokens_mlm": P(a caption token is selected for masking)
            ),
        )
    )


def _demo_zeroshot(attribute: str, *templates: str) -> dict:
    return dict(type="zeroshot_classification", dataset="demo", label_field=attribute, templates=templates)


def _evals() -> dict:
    """Evaluations (veclip_jax/eval/registry.py documents an entry): name -> task type, dataset, options.

    Training runs each at its `every` (0 = eval_every) and at the end;
    `launch/eval.py --model=WORKDIR` runs the same entries. Metrics are logged
    as NAME/METRIC. These defaults evaluate the demo data's held-out split
    (skipped when training on other data): zero-shot top-1 of each labelled
    attribute, prompts that fit the demo, and retrieval with each VeCap caption.
    """
    return dict(
        eval_batch_size=256,  # images or texts per encoding batch (global)
        # JPEGs decoded at reduced DCT scale, resized by torch (EvalPreprocess.fast: 2.4-2.9x less CPU an
        # image; not HF's exact pixels, which launch/eval.py uses unless given --fast_decode)
        eval_fast_decode=False,
        evals=ml_collections.ConfigDict(
            dict(
                demo_color=_demo_zeroshot(
                    "color", "a {} shape.", "an image of a {} object.", "a {} object on a background."
                ),
                demo_shape=_demo_zeroshot("shape", "a {}.", "an image of a {}.", "a {} shape."),
                demo_size=_demo_zeroshot("size", "a {} shape.", "an image of a {} object."),
                demo_position=_demo_zeroshot(
                    "position", "a shape at the {}.", "an image with an object at the {}."
                ),
                demo_background=_demo_zeroshot(
                    "background", "a shape on a {} background.", "an image with a {} background."
                ),
                demo_retrieval=dict(
                    type="retrieval", dataset="demo", caption_field="vecap_text", recall_at=(1, 5)
                ),
            )
        ),
    )
