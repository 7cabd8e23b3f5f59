"""Evaluate a model: python launch/eval.py --model=PATH --tasks=imagenet,imagenet_v2,coco,flickr30k
[--data_dir=DIR] [--output_dir=OUT] (or `veclip-eval ...` once the package is installed).

PATH is anything `veclip_jax.load` reads: a training workdir (its newest
checkpoint, or --step), a checkpoint directory, a HuggingFace CLIP directory,
a released VeCLIP checkpoint (with --tokenizer=T5's spiece.model), an open_clip
local-dir or a bare open_clip state dict (with --model_name=RN50, ViT-B-32, ...). Tasks:
the standard ones by name (imagenet, imagenet_v2, coco, flickr30k, cifar10,
cifar100, ... see veclip_jax/eval/registry.py), `folder:DIR` (an ImageFolder
tree), `tfds:NAME[:SPLIT]`, `linear_probe:TASK`, or the names of a workdir's
config.evals entries (all of them when --tasks is not given). Prints the
paper's table and how each task was scored (token-wise late interaction for a
FILIP run's zero-shot and retrieval tasks, pooled embeddings otherwise),
writes a CLIP_benchmark-style JSON file per task into OUT and,
for a workdir, appends the metrics to its eval.jsonl. Missing data is
refused with where to put it (exit code 2).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from veclip_jax.errors import UserError

_MODEL = flags.DEFINE_string("model", None, "A workdir, checkpoint or HF CLIP directory.")
_TASKS = flags.DEFINE_list("tasks", [], "Comma-separated task names (default: the workdir's config.evals).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Root of the datasets (TFDS data_dir, coco/, flickr30k/).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "Where the JSON files go.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images or texts per global encoding batch.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer for a HF dir without one (VeCLIP).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the newest).")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "open_clip's model config (RN50, ViT-B-32, ...) for a bare open_clip state dict."
)
_MAX = flags.DEFINE_integer("max_examples", 0, "Only the first N examples of each dataset (0 = all).")
_FAST_DECODE = flags.DEFINE_bool(
    "fast_decode", False,
    "Decode JPEGs at reduced DCT scale, resize with torch: 2.4-2.9x less CPU an image; not HF's pixels.",
)  # fmt: skip
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _MODEL.value:
        raise app.UsageError("--model is required, e.g. --model=workdir/demo")
    if _BATCH.value < 1:
        print(f"error: --batch_size={_BATCH.value}: must be >= 1 (images or texts per encoding batch)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's read-only notes are not the user's concern
    logging.getLogger("veclip_jax").setLevel(logging.INFO)
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from veclip_jax.eval.datasets import DatasetError
    from veclip_jax.eval.run import evaluate

    try:
        out = evaluate(
            _MODEL.value, _TASKS.value, data_dir=_DATA_DIR.value, output_dir=_OUTPUT_DIR.value,
            batch_size=_BATCH.value, tokenizer=_TOKENIZER.value, step=_STEP.value, max_examples=_MAX.value,
            model_name=_MODEL_NAME.value, fast_decode=_FAST_DECODE.value,
        )  # fmt: skip
    except (UserError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        for key, rate in out.images_per_sec.items():
            if rate == rate:  # NaN: the task's images were embedded by another task (shared)
                print(f"{key}: {rate:.0f} images/s embedding")
        print(out.table)
        from veclip_jax.eval.tokenwise import DESCRIPTION

        for how in sorted(set(out.scoring.values())):
            tasks = [k for k, v in out.scoring.items() if v == how]
            print(f"scoring ({', '.join(tasks)}): {DESCRIPTION[how]}")
        if out.files:
            print(f"results: {', '.join(out.files)}")
        if out.write_error:  # the table above is the whole result; only its files are missing
            print(f"error: {out.write_error}", file=sys.stderr)
            sys.exit(1)


def run() -> None:
    """The console script `veclip-eval` (and `python launch/eval.py`)."""
    app.run(main)
