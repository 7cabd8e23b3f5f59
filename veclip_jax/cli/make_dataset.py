"""Converts raw image-text pairs into ArrayRecord training shards (veclip_jax.data.convert).

img2dataset webdataset tars, with VeCLIP's VeCap captions joined by image URL:

    python launch/make_dataset.py --webdataset='/data/cc3m/{00000..00331}.tar' \\
        --vecap_json='/data/vecap/*.json' --out=/data/vecap/train --num_shards=166 --workers=16

A CSV/TSV table of image paths and captions:

    python launch/make_dataset.py --table=/data/pairs.csv --image_root=/data/images \\
        --out=/data/pairs/train --num_shards=8

Parquet tables (image bytes or paths, caption columns; img2dataset's or HuggingFace's), and an
ImageFolder tree with a captions file:

    python launch/make_dataset.py --parquet='/data/laion/*.parquet' --alt_text_column=caption \\
        --out=/data/laion/train --num_shards=64
    python launch/make_dataset.py --image_folder=/data/pets --captions=/data/pets/captions.json \\
        --out=/data/pets/train --num_shards=4

Several machines share one conversion: each runs the same command with --num_tasks=M and its own
--task_index=i, and writes the output shards j with j % M == i; the one that finishes last also
writes the whole summary. That suits a SLURM array. On a Ray cluster one command does it:

    python launch/make_dataset.py --webdataset='/nfs/cc3m/{00000..00331}.tar' \
        --out=/nfs/cc3m/train --num_shards=166 --ray_address=auto

Each output shard is then a Ray task (one CPU), written by the same code: the shards are byte for
byte those of a local run. --ray_address: local (a Ray on this machine only, started for this
command), auto (the cluster this machine joined with `ray start`), HOST:PORT of the head, or
ray://HOST:10001 (Ray Client). The inputs and OUT must be on a file system every node mounts at
the same path (the VeCap index is written next to OUT for the workers to read), and veclip_jax
installed on every node. --workers, if given, caps the shards in flight (default: no cap).

Rerunning the same command resumes: finished shards are kept, the rest are
written. The summary is printed and written to OUT.stats.json. The veclip_jax
package must be installed (`pip install -e .`, as `make setup` does).

Exit status: 0 done; 1 no record written, or the machine failed (a full disk:
one line, no temporary file left); 2 a user error (a missing input, a bad
option, a malformed VeCap JSON, an output made by another conversion or being
written by a live converter), one line naming what to change.
"""

import argparse
import logging
import os
import sys

from veclip_jax.data import convert
from veclip_jax.data.readers.table import TableColumns
from veclip_jax.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python launch/make_dataset.py",
        description="Convert img2dataset webdataset tars or a CSV/TSV table into ArrayRecord shards.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--webdataset", help="input tars: comma-separated paths, {000..123} ranges, globs")
    src.add_argument("--table", help="a CSV (or .tsv/.tab: tab-separated) table with a header line")
    src.add_argument("--parquet", help="Parquet tables: comma-separated paths, ranges, globs")
    src.add_argument("--image_folder", help="an ImageFolder tree ROOT/CLASS/IMAGE (captions: --captions)")
    p.add_argument("--out", required=True, help="output prefix: OUT-00000-of-0000N.array_record, ...")
    p.add_argument("--num_shards", type=int, required=True, help="output shards (webdataset: <= input tars)")
    p.add_argument("--vecap_json", default="", help="VeCap JSON files {url: caption}, joined by URL")
    p.add_argument("--source", default=None, help="corpus name stored in every record, e.g. cc3m")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPUs); Ray: cap")
    # None when not given, so that --ray_address can refuse them even at their default values.
    p.add_argument("--num_tasks", type=int, default=None, help="machines sharing this conversion (default 1)")
    p.add_argument("--task_index", type=int, default=None, help="this machine's index in [0, num_tasks)")
    p.add_argument(
        "--ray_address",
        default=None,
        help="write the shards as tasks on Ray: local, auto, HOST:PORT or ray://HOST:10001 (OUT shared)",
    )
    p.add_argument(
        "--verify_images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip images the training pipeline cannot decode (JPEGs decoded at 1/8 scale)",
    )
    f = p.add_argument_group("image folder inputs")
    f.add_argument(
        "--captions", default=None, help="JSON {relative path: caption} or JSON lines {image, caption}"
    )
    f.add_argument("--class_template", default=None, help='caption of images without one: "a photo of a {}."')
    t = p.add_argument_group("table and Parquet inputs")
    t.add_argument(
        "--image_root", default=None, help="base of relative image paths (default: the table's dir)"
    )
    t.add_argument(
        "--delimiter",
        default=None,
        help="separator; \\t or tab: a tab (default: tab for .tsv/.tab, else comma)",
    )
    defaults = TableColumns()
    for field in ("image", "alt_text", "vecap_text", "key", "url"):
        t.add_argument(f"--{field}_column", default=getattr(defaults, field), help=f"column of the {field}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the exit status: 0 done, 1 nothing written or failed, 2 user error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        summary = _convert(args)
    except UserError as e:
        return _fail(str(e), 2)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        return _fail(str(e), 2)  # an input path of the user's
    except OSError as e:  # the machine's: a full disk, a lost mount (temporary files are removed)
        return _fail(f"{type(e).__name__}: {e}", 1)
    print(summary.format())
    if summary.records == 0:
        print("no record was written: check the inputs and the skip reasons above", file=sys.stderr)
        return 1
    return 0


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _convert(args: argparse.Namespace) -> convert.ConversionSummary:
    if args.ray_address is not None:
        given = [f"--{f}" for f in ("num_tasks", "task_index") if getattr(args, f) is not None]
        if given:  # two ways of splitting one conversion: the tasks' shard sets and Ray's would overlap
            raise UserError(
                f"--ray_address spreads every shard over the cluster: drop {' and '.join(given)} "
                "(those split a conversion over hand-run machines, e.g. a SLURM array)"
            )
        if not args.ray_address:
            raise UserError("--ray_address is empty: use local, auto, HOST:PORT or ray://HOST:10001")
    workers = args.workers
    if workers is None:
        workers = 0 if args.ray_address is not None else os.cpu_count() or 1
    common = dict(
        vecap_json=args.vecap_json or None,
        source=args.source,
        workers=workers,
        verify_images=args.verify_images,
        task=(args.task_index or 0, 1 if args.num_tasks is None else args.num_tasks),
        ray_address=args.ray_address,
    )
    columns = TableColumns(
        image=args.image_column,
        alt_text=args.alt_text_column,
        vecap_text=args.vecap_text_column,
        key=args.key_column,
        url=args.url_column,
    )
    if args.webdataset:
        summary = convert.convert_webdataset(args.webdataset, args.out, args.num_shards, **common)
    elif args.parquet:
        summary = convert.convert_parquet(
            args.parquet, args.out, args.num_shards, columns=columns, image_root=args.image_root, **common
        )
    elif args.image_folder:
        summary = convert.convert_image_folder(
            args.image_folder,
            args.out,
            args.num_shards,
            captions=args.captions,
            class_template=args.class_template,
            **common,
        )
    else:
        summary = convert.convert_table(
            args.table,
            args.out,
            args.num_shards,
            image_root=args.image_root,
            columns=columns,
            # A shell makes it hard to type a tab: "\t" and "tab" mean one.
            delimiter={"\\t": "\t", "tab": "\t"}.get(args.delimiter, args.delimiter),
            **common,
        )
    return summary


def run() -> None:
    """The console script `veclip-make-dataset` (and `python launch/make_dataset.py`)."""
    sys.exit(main())
