"""Cloud TPU pods: create a queued resource, run the trainer on every worker, survive preemption.

  python launch/tpu.py create|run|status|logs|delete --name=NAME --accelerator=v5p-256 \
      --zone=ZONE [--project=PROJECT] [--spot|--reserved] [--num_slices=N] \
      --config=configs/X.py --workdir=gs://BUCKET/run [--watch] [--dry_run] [-- trainer overrides]

Everything goes through `gcloud` (queued resources, then `tpu-vm ssh --worker=all`), as big_vision
and maxtext launch: no bastion, no image to build. The command run on every worker is a start-up
that installs the project at this checkout's commit with its pinned requirements and the TPU runtime
matching the pinned jax, checks that the devices JAX sees are the accelerator the config names
(exit 2 otherwise), then runs `launch/train.py --distributed`. A re-run of the same command resumes
from the workdir (the trainer resumes from its newest checkpoint), so `run --watch` handles a
preempted spot pod by deleting the queued resource, re-creating it and re-running the command.
`--dry_run` prints every command instead of running it (it only reads gcloud's configured project
when --project is not given, once, as every command then names it). Run it from a checkout (it reads
requirements.txt, the config file and the commit from there); the workers clone `--repo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from veclip_jax.cli import split_overrides
from veclip_jax.errors import UserError
from veclip_jax.parallel.hardware import Accelerator, check_devices, parse_hardware

# The TPU VM image per generation (Cloud's runtime versions for JAX on each).
RUNTIME_VERSIONS: dict[str, str] = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
# Queued-resource states (`state.state`) after which the slice is gone and must be re-created.
LOST_STATES = frozenset({"SUSPENDED", "SUSPENDING", "PREEMPTED", "FAILED"})
WAITING_STATES = frozenset(
    {"CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES", "DELETING", "UNKNOWN"}
)
NOT_FOUND = "NOT_FOUND"
SSH_LOST = 255  # ssh's own exit code: the connection failed or dropped (a VM going down)
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: veclip_jax/cli/tpu.py -> .
# Packages of requirements.txt that a TPU VM must not install: torch (export checks only) pulls CUDA.
_SKIP_ON_TPU = ("torch",)
# Cloud's resource names (lowercase letter first, at most 63): the name is an argument to gcloud and
# part of a path in the workers' script, so nothing else is let through.
_RESOURCE_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ACCELERATOR = re.compile(r"[a-z][a-z0-9]*-[0-9]+")  # v5p-256, v5litepod-16, ...


@dataclasses.dataclass
class Job:
    """One pod run: what `gcloud` needs and what runs on the workers."""

    name: str
    accelerator: str  # Cloud's accelerator type, e.g. "v5p-256"
    zone: str
    project: str
    config: str
    workdir: str
    spot: bool = False
    reserved: bool = False
    num_slices: int = 1
    overrides: tuple[str, ...] = ()
    repo: str = ""
    commit: str = ""
    python: str = "python3.11"

    @property
    def hardware(self) -> str:
        """config.hardware for this pod: tpu-v5p-256, or tpu-v5p-256-2 for two slices."""
        suffix = f"-{self.num_slices}" if self.num_slices > 1 else ""
        return f"tpu-{self.accelerator}{suffix}"

    @property
    def parsed(self) -> Accelerator:
        return parse_hardware(self.hardware)

    @property
    def nodes(self) -> list[str]:
        """The TPU VM names: the queued resource's node id, or NAME-0.. for multislice."""
        if self.num_slices == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.num_slices)]

    @property
    def log_file(self) -> str:
        """Where each worker appends the trainer's console output (on the TPU VM's disk), shell-quoted."""
        return "~/veclip-logs/" + shlex.quote(f"{self.name}.log")  # ~ outside the quotes: expanded

    def check(self) -> None:
        """UserError naming a field that gcloud or the workers' git could read as something else.

        A control character (a newline ends the workers' script line) anywhere; a
        name that is not a Cloud resource name; an accelerator not in Cloud's
        form (`$`-anchored matching let a trailing newline through); a --repo
        or --commit starting with '-', which git would take for an option.
        """
        fields = {"name": self.name, "accelerator": self.accelerator, "zone": self.zone,
                  "project": self.project, "config": self.config, "workdir": self.workdir,
                  "repo": self.repo, "commit": self.commit}  # fmt: skip
        fields |= {f"override {o!r}": o for o in self.overrides}
        for field, value in fields.items():
            bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
            if bad is not None:
                name = field if field.startswith("override") else f"--{field}"
                raise UserError(f"{name}: control character {bad!r}")
        if not _RESOURCE_NAME.fullmatch(self.name):
            raise UserError(f"--name={self.name!r}: a Cloud resource name (lowercase letters, digits and "
                            "'-', a letter first, at most 63)")  # fmt: skip
        if not _ACCELERATOR.fullmatch(self.accelerator):
            raise UserError(f"--accelerator={self.accelerator!r}: a Cloud TPU type such as v5p-256")
        for field in ("repo", "commit", "zone", "project"):
            if getattr(self, field).startswith("-"):
                raise UserError(f"--{field}={getattr(self, field)!r}: starts with '-' (read as an option)")


def _where(job: Job) -> list[str]:
    return [f"--project={job.project}", f"--zone={job.zone}"]


def create_command(job: Job) -> list[str]:
    """`gcloud alpha compute tpus queued-resources create`: one slice, or N over DCN (multislice)."""
    cmd = ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", job.name, *_where(job),
           f"--accelerator-type={job.accelerator}",
           f"--runtime-version={RUNTIME_VERSIONS[job.parsed.generation]}"]  # fmt: skip
    if job.num_slices == 1:
        cmd.append(f"--node-id={job.name}")
    else:
        cmd += [f"--node-count={job.num_slices}", f"--node-prefix={job.name}"]
    if job.spot:
        cmd.append("--spot")
    if job.reserved:
        cmd.append("--reserved")
    return cmd


def status_command(job: Job) -> list[str]:
    """Prints the queued resource's state (ACTIVE, SUSPENDED, ...) alone on a line."""
    return ["gcloud", "alpha", "compute", "tpus", "queued-resources", "describe", job.name, *_where(job),
            "--format=value(state.state)"]  # fmt: skip


def delete_command(job: Job) -> list[str]:
    """Deletes the queued resource and its TPU VMs (--force), without a prompt."""
    return ["gcloud", "alpha", "compute", "tpus", "queued-resources", "delete", job.name, *_where(job),
            "--force", "--quiet"]  # fmt: skip


def ssh_command(job: Job, node: str, command: str, worker: str = "all") -> list[str]:
    """Runs `command` on the workers of one TPU VM (all of them by default)."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_where(job), f"--worker={worker}",
            f"--command={command}"]  # fmt: skip


def pinned_version(package: str, requirements: Path = REPO_ROOT / "requirements.txt") -> str:
    """The `package==X` version pinned in requirements.txt (the TPU runtime must match jax's)."""
    for line in requirements.read_text().splitlines():
        m = re.match(rf"^{re.escape(package)}==([^\s;#]+)", line.strip())
        if m:
            return m.group(1)
    raise UserError(f"{requirements}: {package} is not pinned (expected a line {package}==VERSION)")


def trainer_command(job: Job) -> list[str]:
    """What every worker runs once the devices check out: the trainer, multi-host."""
    return ["python", "launch/train.py", f"--config={job.config}", f"--workdir={job.workdir}",
            "--distributed", f"--config.hardware={job.hardware}", *job.overrides]  # fmt: skip


def startup_script(job: Job) -> str:
    """The command each worker runs: install the project at `job.commit`, check devices, train.

    Idempotent, so a re-run after a preemption (fresh VMs) and a re-run on the same VMs both work;
    pip makes the second install a no-op. One line per step, joined with newlines: `set -e` stops
    at the first failure and the ssh exit code is that step's (2 for the device check).
    """
    job.check()  # the script runs as the job's user on every worker: nothing in it may be code
    skip = "|".join(_SKIP_ON_TPU)
    jax_version = pinned_version("jax")
    q = shlex.quote
    lines = [
        "set -euo pipefail",
        f"command -v {job.python} >/dev/null || "
        f"(sudo apt-get update -qq && sudo apt-get install -y -qq {job.python} {job.python}-venv)",
        f"if [ ! -d ~/veclip-jax/.git ]; then git clone -q -- {q(job.repo)} ~/veclip-jax; fi",
        "cd ~/veclip-jax",
        # the trailing `--`: the commit is a revision, never a path (a leading '-' is refused by check)
        f"git fetch -q origin && git checkout -q --force {q(job.commit)} --",
        f"[ -x ~/veclip-venv/bin/python ] || {job.python} -m venv ~/veclip-venv",
        "source ~/veclip-venv/bin/activate",
        f'grep -vE "^({skip})==" requirements.txt > /tmp/veclip-requirements.txt',
        "pip install -q -r /tmp/veclip-requirements.txt",
        "pip install -q --no-deps -e .",
        f'pip install -q "jax[tpu]=={jax_version}"',
        *(["pip install -q gcsfs  # etils.epath writes gs:// through fsspec: not in requirements.txt"]
          if job.workdir.startswith("gs://") else []),  # fmt: skip
        f"python launch/tpu.py check-devices --hardware={job.hardware}",
        "mkdir -p ~/veclip-logs",
        f"{shlex.join(trainer_command(job))} 2>&1 | tee -a {job.log_file}",
    ]
    return "\n".join(lines)


def logs_command(job: Job, lines: int = 200) -> list[str]:
    """The last lines of worker 0's trainer output (process 0 also writes metrics to the workdir)."""
    return ssh_command(job, job.nodes[0], f"tail -n {lines} {job.log_file}", worker="0")


# -- running: a Runner executes (or, in a dry run, prints) one command and returns its exit code.


class Runner:
    """Runs gcloud commands; `dry_run` prints each one (`$ cmd`) and pretends it succeeded."""

    def __init__(self, dry_run: bool = False, out: Any = None) -> None:
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def __call__(self, cmd: Sequence[str], capture: bool = False) -> tuple[int, str]:
        if self.dry_run:
            print("$ " + shlex.join(cmd), file=self.out, flush=True)
            return 0, "ACTIVE" if capture else ""
        if capture:
            proc = subprocess.run(list(cmd), capture_output=True, text=True)
            return proc.returncode, proc.stdout.strip()
        return subprocess.run(list(cmd)).returncode, ""

    def parallel(self, cmds: Sequence[Sequence[str]]) -> int:
        """Runs the commands at once (one ssh per slice); the first non-zero exit code, else 0."""
        if self.dry_run or len(cmds) == 1:
            return next((rc for rc, _ in (self(c) for c in cmds) if rc), 0)
        procs = [subprocess.Popen(list(c)) for c in cmds]
        codes = [p.wait() for p in procs]
        return next((rc for rc in codes if rc), 0)


def state(job: Job, runner: Runner) -> str:
    """The queued resource's state, or NOT_FOUND when describe fails (absent or deleted)."""
    rc, out = runner(status_command(job), capture=True)
    if rc != 0 or not out:
        return NOT_FOUND
    return out.split()[-1].upper()


def wait_active(job: Job, runner: Runner, poll_s: float, sleep: Callable[[float], None]) -> str:
    """Polls until ACTIVE (returned) or a state that will not become ACTIVE (returned as it is)."""
    while True:
        current = state(job, runner)
        if current not in WAITING_STATES:
            return current
        print(f"[veclip-tpu] {job.name}: {current}; polling every {poll_s:g} s", flush=True)
        sleep(poll_s)


def run_job(job: Job, runner: Runner, watch: bool, poll_s: float = 60.0, max_restarts: int = 100,
            sleep: Callable[[float], None] = time.sleep) -> int:  # fmt: skip
    """Creates the queued resource if absent, waits for it, runs the start-up on every worker.

    With `watch`, a slice lost while the command runs (preempted or suspended spot capacity, a
    failed resource) is deleted, re-created and the same command run again: the trainer resumes
    from the workdir. Stops when the command exits 0, or with the command's exit code when it fails
    on a slice that is still ACTIVE (a config error, a crash: re-running would not help).
    """
    script = startup_script(job)
    restarts = 0
    while True:
        current = wait_active(job, runner, poll_s, sleep) if not runner.dry_run else NOT_FOUND
        if current in LOST_STATES:
            print(f"[veclip-tpu] {job.name}: {current}: deleting and re-creating", flush=True)
            runner(delete_command(job))
            current = NOT_FOUND
        if current == NOT_FOUND:
            rc, _ = runner(create_command(job))
            if rc:
                print(f"[veclip-tpu] create failed (exit {rc})", file=sys.stderr)
                return rc
            current = wait_active(job, runner, poll_s, sleep)
        if current != "ACTIVE":
            if watch and current in LOST_STATES and restarts < max_restarts:
                restarts += 1
                continue
            print(f"[veclip-tpu] {job.name}: {current}, not ACTIVE", file=sys.stderr)
            return 1
        rc = runner.parallel([ssh_command(job, node, script) for node in job.nodes])
        if rc == 0:
            if not runner.dry_run:
                print(f"[veclip-tpu] {job.name}: training finished (exit 0)", flush=True)
            return 0
        after = state(job, runner)
        if watch and after == "ACTIVE" and rc == SSH_LOST:  # the slice may be on its way down: look again
            sleep(poll_s)
            after = state(job, runner)
        if not watch or after == "ACTIVE" or restarts >= max_restarts:
            print(f"[veclip-tpu] {job.name}: the command exited {rc} (slice {after})", file=sys.stderr)
            return rc
        restarts += 1
        print(f"[veclip-tpu] {job.name}: {after} while training (exit {rc}): restart {restarts}, "
              "resuming from the workdir", flush=True)  # fmt: skip


def check_devices_main(hardware: str, distributed: bool = True, devices: Sequence[Any] | None = None) -> int:
    """Prints the devices JAX sees; 2 if they are not the accelerator `hardware` names, else 0."""
    if devices is None:
        import jax

        if distributed:
            jax.distributed.initialize()
        devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    print(f"[veclip-tpu] JAX sees {len(devices)} devices ({', '.join(kinds)})", flush=True)
    try:
        check_devices(hardware, devices)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def gcloud_project() -> str:
    """gcloud's configured project (`gcloud config get-value project`), '' when unset or no gcloud.

    What gcloud itself would use without --project (the core/project property,
    or CLOUDSDK_CORE_PROJECT): read once, so that every command of a long
    `run --watch` names the same project even if the configuration changes.
    """
    try:
        proc = subprocess.run(["gcloud", "config", "get-value", "project"], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = proc.stdout.strip().splitlines()
    value = lines[-1].strip() if proc.returncode == 0 and lines else ""
    return "" if value == "(unset)" else value


def _git(*args: str) -> str:
    """A read-only git query about this checkout ('' when it fails)."""
    proc = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="veclip-tpu", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["create", "run", "status", "logs", "delete", "check-devices"])
    p.add_argument("--name", help="queued resource (and TPU VM) name")
    p.add_argument("--accelerator", default="v5p-256", help="Cloud accelerator type (v4-512, v5p-256, ...)")
    p.add_argument("--zone")
    p.add_argument("--project", help="default: gcloud's configured project (gcloud config get-value project)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="spot capacity: cheaper, can be preempted")
    kind.add_argument("--reserved", action="store_true", help="the project's reservation")
    p.add_argument("--num_slices", type=int, default=1, help="slices over DCN (multislice)")
    p.add_argument("--config", help="configs/X.py[:ARG], relative to the repository")
    p.add_argument("--workdir", help="gs://BUCKET/run: shared by all workers, kept across preemptions")
    p.add_argument("--repo", default=None, help="git URL the workers clone (default: this checkout's origin)")
    p.add_argument("--commit", default=None, help="commit the workers check out (default: this HEAD)")
    p.add_argument("--watch", action="store_true", help="run: re-create and re-run after a preemption")
    p.add_argument("--poll_s", type=float, default=60.0, help="seconds between state polls")
    p.add_argument("--max_restarts", type=int, default=100)
    p.add_argument("--lines", type=int, default=200, help="logs: how many lines")
    p.add_argument("--dry_run", action="store_true", help="print every command instead of running it")
    p.add_argument("--hardware", default="", help="check-devices: the config.hardware to check against")
    p.add_argument("--no_distributed", action="store_true", help="check-devices: one host only")
    return p


def _required(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if not getattr(args, n)]
    if missing:
        raise UserError(f"{args.action} needs {', '.join(missing)}")


def main(argv: Sequence[str] | None = None, sleep: Callable[[float], None] = time.sleep) -> int:
    """The command line; returns the exit code (2: a usage or config error, one line on stderr)."""
    argv, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.action == "check-devices":
            return check_devices_main(args.hardware, distributed=not args.no_distributed)
        _required(args, "name", "zone")
        if not args.project:
            args.project = gcloud_project() or ("PROJECT" if args.dry_run else "")
            if not args.project:
                raise UserError("--project: not given, and gcloud has no configured project "
                                "(gcloud config set project ID)")  # fmt: skip
            print(f"[veclip-tpu] --project={args.project} (gcloud's configured project)", file=sys.stderr)
        if args.num_slices < 1:
            raise UserError(f"--num_slices={args.num_slices}: at least 1")
        job = Job(args.name, args.accelerator, args.zone, args.project, args.config or "",
                  args.workdir or "", spot=args.spot, reserved=args.reserved, num_slices=args.num_slices,
                  overrides=tuple(overrides))  # fmt: skip
        job.check()
        if job.parsed.platform != "tpu" or job.parsed.generation not in RUNTIME_VERSIONS:
            known = ", ".join(RUNTIME_VERSIONS)
            raise UserError(f"--accelerator={args.accelerator}: not a Cloud TPU type ({known}-N)")
        runner = Runner(dry_run=args.dry_run)
        if args.action == "create":
            return runner(create_command(job))[0]
        if args.action == "status":
            if args.dry_run:
                return runner(status_command(job))[0]
            print(state(job, runner))
            return 0
        if args.action == "delete":
            return runner(delete_command(job))[0]
        if args.action == "logs":
            return runner(logs_command(job, args.lines))[0]
        _required(args, "config", "workdir")
        if not (REPO_ROOT / args.config.split(":")[0]).is_file():
            raise UserError(f"--config={args.config}: no such file in {REPO_ROOT}")
        job.repo = args.repo or _git("remote", "get-url", "origin") or ("REPO_URL" if args.dry_run else "")
        job.commit = args.commit or _git("rev-parse", "HEAD") or ("COMMIT" if args.dry_run else "")
        if not job.repo or not job.commit:
            raise UserError("--repo/--commit: this checkout has no origin remote or commit; pass them")
        job.check()
        if not args.dry_run and not args.commit and _git("status", "--porcelain", "--untracked-files=no"):
            print(f"[veclip-tpu] warning: uncommitted changes; the workers run commit {job.commit[:12]}",
                  file=sys.stderr)  # fmt: skip
        return run_job(job, runner, args.watch, args.poll_s, args.max_restarts, sleep)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The console script `veclip-tpu` (and `python launch/tpu.py`)."""
    sys.exit(main())
