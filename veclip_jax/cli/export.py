"""Export a checkpoint to a HuggingFace transformers CLIP directory, or to open_clip's layout.

  python launch/export.py --checkpoint=workdir/demo --out=exported/demo [--step=N] [--force]
  python launch/export.py --checkpoint=workdir/demo --out=exported/oc --format=open_clip

`--checkpoint` is a training workdir, its checkpoints directory or one step's
directory (the newest step unless --step). The output loads offline with
`transformers.CLIPModel.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)`
(README: "Export to HuggingFace"); with --format=open_clip, with
`open_clip.create_model_and_transforms("local-dir:OUT")` (veclip_jax/openclip/export.py).
An existing OUT is refused unless --force.
"""

from __future__ import annotations

import sys

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints directory or step directory.")
_OUT = flags.DEFINE_string("out", None, "The HF directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing output directory.")
_FORMAT = flags.DEFINE_enum(
    "format", "hf", ["hf", "open_clip"], "hf: transformers CLIPModel; open_clip: a local-dir for open_clip."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--checkpoint and --out are required")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-file INFO lines
    from veclip_jax.errors import UserError
    from veclip_jax.hf.to_hf import export_checkpoint
    from veclip_jax.openclip.export import export_open_clip

    export = export_open_clip if _FORMAT.value == "open_clip" else export_checkpoint
    try:
        out = export(_CHECKPOINT.value, _OUT.value, step=_STEP.value, force=_FORCE.value)
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


def run() -> None:
    """The console script `veclip-export` (and `python launch/export.py`)."""
    app.run(main)
