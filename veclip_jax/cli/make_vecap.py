"""Writes VeCap captions for your own images (veclip_jax.vecap): VeCLIP's caption pipeline on Ray Data.

A vision-language model captions each image, an LLM screens the caption, and an LLM fuses it with
the image's AltText; the result is VeCLIP's released format, JSON {image_url: caption}, one file
per input shard, that launch/make_dataset.py joins with --vecap_json:

    python launch/make_vecap.py --webdataset='/data/cc3m/{00000..00331}.tar' \\
        --captioner=/models/llava-1.5-7b-hf --fuser=/models/Llama-3.1-8B-Instruct \\
        --out=/data/cc3m_vecap/vecap --num_gpus=1 --concurrency=4
    python launch/make_dataset.py --webdataset='/data/cc3m/{00000..00331}.tar' \\
        --vecap_json='/data/cc3m_vecap/vecap-*.json' --out=/data/cc3m_vecap/train --num_shards=166

Inputs as for launch/make_dataset.py (--webdataset, --parquet, --table, --image_folder and their
column options), or --images=SPEC, which reads the kind from the spec (.tar, .parquet, a table, a
directory). Models are local HuggingFace directories (nothing is downloaded). The check is
made by the fuser model unless --checker names another, and skipped with --no_check (the rule
checks always run). Runs on this machine (Ray started here), or on a Ray cluster with
--ray_address. --dry_run prints the plan and the cost estimate without captioning;
--dry_run --measure=N also captions N images with the real models and measures tokens/s.

Rerunning the same command resumes: finished shards are kept. Exit status: 0 done; 1 no caption
written; 2 a user error (a missing input or model, a bad option, an output being written by
another run or made with other settings), one line naming what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from veclip_jax.data.readers.table import TableColumns
from veclip_jax.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    from veclip_jax.vecap import prompts

    p = argparse.ArgumentParser(prog="python launch/make_vecap.py", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images",
        help="any of the inputs below, its kind read from the spec: .tar files, .parquet files, a "
        ".csv/.tsv/.tab table, or a directory (an ImageFolder tree)",
    )
    src.add_argument("--webdataset", help="input tars: comma-separated paths, {000..123} ranges, globs")
    src.add_argument("--table", help="a CSV (or .tsv/.tab: tab-separated) table with a header line")
    src.add_argument("--parquet", help="Parquet tables: comma-separated paths, ranges, globs")
    src.add_argument("--image_folder", help="an ImageFolder tree ROOT/CLASS/IMAGE (AltTexts: --captions)")
    p.add_argument("--out", required=True, help="output prefix: OUT-00000-of-0000N.json, ...")
    p.add_argument(
        "--num_shards",
        type=int,
        default=0,
        help="input shards (default: one per input file, or per 1,000 table rows)",
    )
    m = p.add_argument_group("models and prompts")
    m.add_argument("--captioner", required=True, help="local HF directory: a LLaVA-style image-text model")
    m.add_argument("--fuser", required=True, help="local HF directory: the LLM fusing AltText and caption")
    m.add_argument(
        "--checker", default=None, help="local HF directory: the LLM screening captions (default: the fuser)"
    )
    m.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="screen each visual caption with the checker LLM (--no_check: rule checks only)",
    )
    m.add_argument("--caption_prompt", default=prompts.CAPTION_PROMPT, help="the captioner's prompt")
    m.add_argument("--check_prompt", default=prompts.CHECK_PROMPT, help="the check, with {caption}")
    m.add_argument(
        "--fusion_prompt",
        default=prompts.FUSION_PROMPT,
        help="the fusion prompt, with {alt_text} and {caption}; @FILE reads it from a file",
    )
    m.add_argument("--max_new_tokens", type=int, default=48, help="visual caption tokens (fusion: twice)")
    m.add_argument("--max_words", type=int, default=77, help="longer captions are dropped as too_long")
    m.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "transformers", "vllm"),
        help="auto: vLLM when importable on a GPU host, else transformers",
    )
    r = p.add_argument_group("resources")
    r.add_argument("--batch_size", type=int, default=8, help="images per model call (part of the output)")
    r.add_argument("--concurrency", type=int, default=1, help="actors per model stage")
    r.add_argument("--num_gpus", type=float, default=0, help="GPUs per actor (0: CPU)")
    r.add_argument("--num_cpus", type=float, default=None, help="CPUs per actor (default 0.5, 1 with GPUs)")
    r.add_argument("--ray_address", default=None, help="a Ray cluster (ray://HEAD:10001 or HEAD:6379)")
    d = p.add_argument_group("cost")
    d.add_argument("--dry_run", action="store_true", help="print the plan and the estimate; caption nothing")
    d.add_argument("--measure", type=int, default=0, help="with --dry_run: caption N images here, time them")
    t = p.add_argument_group("table, Parquet and folder inputs")
    t.add_argument("--image_root", default=None, help="base of relative image paths")
    t.add_argument("--delimiter", default=None, help="table separator; \\t or tab: a tab")
    t.add_argument("--captions", default=None, help="image folder: JSON {relative path: AltText}")
    defaults = TableColumns()
    for field in ("image", "alt_text", "key", "url"):
        t.add_argument(f"--{field}_column", default=getattr(defaults, field), help=f"column of the {field}")
    args = p.parse_args(argv)
    if args.images is not None:
        setattr(args, input_kind(args.images), args.images)
    return args


_KINDS = {".tar": "webdataset", ".parquet": "parquet", ".csv": "table", ".tsv": "table", ".tab": "table"}


def input_kind(spec: str) -> str:
    """Which input flag `--images=spec` stands for: a directory is an ImageFolder tree, files go by
    their extension (one kind for all). Raises UserError naming the explicit flags otherwise."""
    from veclip_jax.data.paths import expand_paths

    if os.path.isdir(os.path.expanduser(spec)):
        return "image_folder"
    kinds = {_KINDS.get(os.path.splitext(path)[1].lower()) for path in expand_paths(spec, what="--images")}
    if len(kinds) != 1 or None in kinds:
        raise UserError(
            f"--images={spec}: not one kind of input (.tar, .parquet, .csv/.tsv/.tab, or a directory); "
            "name it with --webdataset, --parquet, --table or --image_folder"
        )
    return kinds.pop()


def _prompt(value: str) -> str:
    if value.startswith("@"):
        with open(os.path.expanduser(value[1:]), encoding="utf-8") as f:
            return f.read()
    return value


def main(argv: list[str] | None = None) -> int:
    """Runs the pipeline (or the dry run); returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return _main(parse_args(argv))
    except UserError as e:
        return _fail(str(e), 2)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        return _fail(str(e), 2)


def _main(args: argparse.Namespace) -> int:
    from veclip_jax.vecap import cost, pipeline
    from veclip_jax.vecap.options import CaptionOptions, Resources

    inputs = pipeline.Inputs(
        webdataset=args.webdataset,
        parquet=args.parquet,
        table=args.table,
        image_folder=args.image_folder,
        columns=dataclasses.replace(
            TableColumns(),
            image=args.image_column,
            alt_text=args.alt_text_column,
            key=args.key_column,
            url=args.url_column,
        ),
        image_root=args.image_root,
        captions=args.captions,
        delimiter={"\\t": "\t", "tab": "\t"}.get(args.delimiter, args.delimiter),
    )
    options = CaptionOptions(
        captioner=args.captioner,
        fuser=args.fuser,
        checker=args.checker,
        check=args.check,
        caption_prompt=_prompt(args.caption_prompt),
        check_prompt=_prompt(args.check_prompt),
        fusion_prompt=_prompt(args.fusion_prompt),
        max_new_tokens=args.max_new_tokens,
        max_words=args.max_words,
        backend=args.backend,
    )
    resources = Resources(
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_gpus=args.num_gpus,
        num_cpus=args.num_cpus,
        ray_address=args.ray_address,
    )
    if args.measure and not args.dry_run:
        raise UserError("--measure goes with --dry_run")
    if args.dry_run:
        plan = cost.dry_run(
            inputs, args.out, options, resources, num_shards=args.num_shards, measure=args.measure
        )
        print(plan.format())
        return 0
    summary = pipeline.make_vecap(inputs, args.out, options, resources, num_shards=args.num_shards)
    print(summary.format())
    if summary.captions == 0:
        print("no caption was written: check the skip and drop reasons above", file=sys.stderr)
        return 1
    return 0


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run() -> None:
    """`python launch/make_vecap.py`."""
    sys.exit(main())
