"""Train a CLIP model: python launch/train.py --config=configs/demo.py --workdir=/tmp/demo
(or `veclip-train ...` once the package is installed).

Any config field can be overridden (`--config.batch_size=1024`,
`--config.data.vecap_prob=0`). A bad config (unknown field, wrong type, value
out of range, a mesh that does not fit the devices) is refused before any
compute, with the field named (exit code 2). Rerunning with the same workdir
resumes from its newest checkpoint. SIGTERM saves a checkpoint and exits 0.
On a multi-host TPU slice or GPU cluster add `--distributed` (every host runs
the same command).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from veclip_jax.cli import OneLineFromLibraries
from veclip_jax.config import CheckedConfig, ConfigError, check_config, check_overrides
from veclip_jax.errors import UserError
from veclip_jax.parallel.hardware import kept_over_rule, user_fields

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics and TensorBoard go here; reuse it to resume."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU slices, SLURM, ...)."
)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        check_overrides(argv)
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            list(_CONFIG.value)  # a config file that failed to load raises on first use: here, not later
        return rest
    except ConfigError as e:
        _fail(str(e), 2)
    except flags.Error as e:  # a value that does not parse as the field's type
        _fail(f"config: {e}", 2)
    except OSError as e:  # ml_collections wraps a missing or unloadable config file in an OSError
        config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
        reason = str(e).strip().splitlines()[-1].strip()  # the underlying error, e.g. "[Errno 2] ..."
        _fail(f"{config_arg}: cannot load the config file: {reason}", 2)
    except (AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
        _fail(f"config: {type(e).__name__}: {e}", 2)
    raise AssertionError("unreachable")


def _closed_event_loop(kind: type[BaseException] | None, value: BaseException | None) -> bool:
    return kind is RuntimeError and str(value) == "Event loop is closed"


def _quiet_closed_event_loops() -> None:
    """Drops 'RuntimeError: Event loop is closed' reported from tensorstore's callbacks after a failed
    Orbax save (dozens of tracebacks burying the one line that matters), whichever hook reports it
    (sys.excepthook, or sys.unraisablehook while threads wind down); every other error prints."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def on_exception(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not _closed_event_loop(kind, value):
            excepthook(kind, value, tb)

    def on_unraisable(unraisable: Any) -> None:
        if not _closed_event_loop(unraisable.exc_type, unraisable.exc_value):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


def _setup_logging() -> None:
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(OneLineFromLibraries())
    absl_logging.set_verbosity(absl_logging.WARNING)  # libraries (orbax, jax): warnings only
    logging.getLogger("veclip_jax").setLevel(logging.INFO)
    _quiet_closed_event_loops()


def checked_config() -> CheckedConfig:
    """The parsed --config, checked: config.hardware's rule sets the mesh, remat, accumulation,
    dtype, except the fields given as --config.X flags (those win, with a note on stderr when the
    rule says otherwise); then schema and ranges: no JAX needed, nothing computed. train() then
    checks only what needs the devices."""
    given = user_fields(config_flags.get_override_values(flags.FLAGS["config"]))
    for note in kept_over_rule(_CONFIG.value, given):
        print(f"note: {note}", file=sys.stderr)
    return check_config(_CONFIG.value, keep=given)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        config = checked_config()
    except UserError as e:
        _fail(str(e), 2)
    _setup_logging()

    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from veclip_jax.data.skip_and_batch import TooManyBadRecordsError
    from veclip_jax.eval.report import print_eval_table
    from veclip_jax.train.checkpoint import CheckpointSaveError
    from veclip_jax.train.loop import EvaluationError, NonFiniteTrainingError, train

    try:
        result = train(config, _WORKDIR.value)
    except UserError as e:  # what needs the devices (mesh, batch layout), the workdir, checkpoints
        _fail(str(e), 2)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        _fail(str(e), 2)  # a path of the config's (data shards, tokenizer, init_from)
    except (NonFiniteTrainingError, CheckpointSaveError, TooManyBadRecordsError, EvaluationError) as e:
        _fail(str(e), 1)  # the run stopped; its last checkpoint is intact
    except OSError as e:  # the machine's, not ours: a full disk while logging, a lost mount
        _fail(f"{type(e).__name__}: {e}", 1)
    if jax.process_index() == 0:
        if result.preempted:
            saved = f"checkpoint at {result.checkpoint}" if result.checkpoint else "nothing trained yet"
            print(f"stopped at step {result.step} ({saved}); rerun the same command to resume")
        print_eval_table([_WORKDIR.value])


def run() -> None:
    """The console script `veclip-train` (and `python launch/train.py`)."""
    app.run(main, flags_parser=_parse_flags)
