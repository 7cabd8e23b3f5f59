"""GPU clusters under SLURM: write the sbatch script for a config, submit it (or print it).

  python launch/slurm.py --nodes=4 --gpus_per_node=8 --config=configs/X.py --workdir=/shared/run \
      [--partition=P] [--account=A] [--time=48:00:00] [--dry_run] [-- trainer overrides]

One process per GPU (`--ntasks-per-node=<gpus>`): `srun` starts them and `jax.distributed.initialize()`
(the trainer's `--distributed`) reads the coordinator, process count, process id and local GPU from
SLURM's environment by itself. `config.hardware` is set to the cluster (gpu-h100-32 for 4 x 8), so
the config's mesh rules pick the layout and the trainer refuses other devices. Preemption:
`--requeue` lets SLURM put a preempted job back in the queue, and `--signal=TERM@120` sends SIGTERM
to every task two minutes before the time limit: the trainer saves and exits 0. The requeued (or
re-submitted) script runs the same command, which resumes from the workdir.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from veclip_jax.cli import split_overrides
from veclip_jax.errors import UserError
from veclip_jax.parallel.hardware import parse_hardware

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: veclip_jax/cli/slurm.py -> .


def hardware_name(nodes: int, gpus_per_node: int, gpu: str = "h100") -> str:
    """config.hardware for the cluster, e.g. gpu-h100-32; UserError for an unknown GPU."""
    name = f"gpu-{gpu}-{nodes * gpus_per_node}"
    parse_hardware(name)
    return name


# A job name becomes the script's file name (LOG_DIR/JOB_NAME.sbatch) and SLURM's %x in the log's:
# a plain name, so that it cannot name a path outside --log_dir.
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
# Values sbatch reads as they are in an #SBATCH line (what shlex also leaves unquoted).
_SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def check_fields(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    """UserError for a value the script cannot hold: a control character anywhere, a job name that is a path.

    A newline in a header value would end its `#SBATCH` line: the rest would
    run as a command (or end the header, dropping every later directive).
    """
    fields = [(f"--{k}", v) for k, v in vars(args).items() if isinstance(v, str)]
    fields += [(f"override {o!r}", o) for o in overrides]
    for name, value in fields:
        bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise UserError(f"{name}: control character {bad!r} (a newline would end the script's line)")
    if not _JOB_NAME.fullmatch(args.job_name) or args.job_name in (".", ".."):
        raise UserError(f"--job_name={args.job_name!r}: a plain name (letters, digits, _ . + -; no path)")


def sbatch_quote(value: str) -> str:
    """`value` as sbatch reads one #SBATCH argument: double quotes, `\\` and `"` escaped.

    Not shlex.quote: sbatch's own parser (src/sbatch/opt.c `_get_argument`)
    reads a backslash as an escape even inside quotes, and older SLURM knows
    only double quotes; an unquoted `#` would start a comment.
    """
    if _SBATCH_PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_script(args: argparse.Namespace, overrides: Sequence[str]) -> str:
    """The batch script: SBATCH header, then one srun of the trainer, one process per GPU."""
    check_fields(args, overrides)
    hardware = hardware_name(args.nodes, args.gpus_per_node, args.gpu)
    q = sbatch_quote
    header = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={args.gpus_per_node}",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--cpus-per-task={args.cpus_per_task}",
        f"--time={q(args.time)}",
        f"--chdir={q(args.chdir)}",
        f"--output={q(f'{Path(args.chdir) / args.log_dir}/%x-%j.out')}",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--signal={q(args.signal)}",
        "--requeue" if args.requeue else "--no-requeue",
    ]
    if args.partition:
        header.append(f"--partition={q(args.partition)}")
    if args.account:
        header.append(f"--account={q(args.account)}")
    train = ["python", "launch/train.py", f"--config={args.config}", f"--workdir={args.workdir}",
             "--distributed", f"--config.hardware={hardware}", *overrides]  # fmt: skip
    lines = ["#!/bin/bash", f"# veclip-jax: {args.config} on {args.nodes} x {args.gpus_per_node} GPUs"]
    lines += [f"#SBATCH {h}" for h in header]
    lines += [
        "set -euo pipefail",
        f"source {shlex.quote(args.venv)}/bin/activate",
        'echo "[veclip-slurm] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        # --kill-on-bad-exit: one failed process stops all (the others would wait in a collective).
        "srun --kill-on-bad-exit=1 " + shlex.join(train),
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="veclip-slurm", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help="GPU generation in config.hardware (gpu-h100-N)")
    p.add_argument("--config", required=True, help="configs/X.py[:ARG], relative to --chdir")
    p.add_argument("--workdir", required=True, help="a path every node sees (shared filesystem)")
    p.add_argument("--job_name", default="veclip")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--time", default="48:00:00", help="SLURM time limit")
    p.add_argument("--cpus_per_task", type=int, default=12, help="input pipeline workers per GPU")
    p.add_argument("--signal", default="TERM@120", help="sent to every task this long before the limit")
    p.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=True,
                   help="SLURM re-queues a preempted job; it resumes from the workdir")  # fmt: skip
    p.add_argument("--chdir", default=str(REPO_ROOT), help="the repository on the cluster's filesystem")
    p.add_argument("--venv", default=".venv", help="virtualenv to activate (relative to --chdir)")
    p.add_argument("--log_dir", default="slurm_logs", help="SLURM output files (relative to --chdir)")
    p.add_argument("--script", default="", help="the script's path (default: LOG_DIR/JOB_NAME.sbatch)")
    p.add_argument("--dry_run", action="store_true", help="write and print the script, do not submit it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Writes the script, then `sbatch` it (or prints it with --dry_run); the exit code."""
    argv, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        check_fields(args, overrides)  # first: the messages below print these values
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise UserError("--nodes and --gpus_per_node: at least 1")
        if not (Path(args.chdir) / args.config.split(":")[0]).is_file():
            raise UserError(f"--config={args.config}: no such file in {args.chdir}")
        script = sbatch_script(args, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(args.script or Path(args.chdir) / args.log_dir / f"{args.job_name}.sbatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    (Path(args.chdir) / args.log_dir).mkdir(parents=True, exist_ok=True)  # SLURM does not create it
    path.write_text(script)
    cmd = ["sbatch", str(path)]
    if args.dry_run:
        print(f"# {path}\n{script}$ {shlex.join(cmd)}")
        return 0
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def run() -> None:
    """The console script `veclip-slurm` (and `python launch/slurm.py`)."""
    sys.exit(main())
