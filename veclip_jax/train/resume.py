"""What a resume may change: the config now against the one that saved the checkpoint.

A change the checkpoint cannot be restored into (the towers, the objective,
the optimizer state's layout) is refused before restoring, naming the fields
with their saved and new values: it is the config's doing, not damage to the
checkpoint (which Checkpointer.restore_latest would otherwise set aside). A
change of the learning-rate schedule (total_steps, peak, warm-up) is allowed
and said loudly, with the learning rate at the resume step before and after;
a change of the data, in one line each.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import ml_collections

from veclip_jax import defaults
from veclip_jax.errors import ConfigError
from veclip_jax.train.optim import learning_rate_schedule

log = logging.getLogger("veclip_jax.train.loop")  # the loop's logger: these lines are the loop's


def _changed(now: Any, then: Any, prefix: str) -> list[str]:
    """The dotted fields whose values differ between two config sections (JSON round trip: lists)."""
    now = json.loads(ml_collections.ConfigDict(dict(now)).to_json_best_effort())
    then = json.loads(ml_collections.ConfigDict(dict(then)).to_json_best_effort())
    out = []
    for key in sorted(set(now) | set(then)):
        a, b = now.get(key), then.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}")
    return out


# What a checkpoint cannot be restored into when it changed: the parameters' and the optimizer
# state's shapes and structure (clipping adds a transform's state), the objective's heads and state.
_RESTORE_FIELDS = ("model", "objective", "optim.grad_clip_norm")
# What changes the run from the resume step on: one log line each.
_SCHEDULE_FIELDS = ("total_steps", "optim.learning_rate", "optim.warmup_steps", "optim.warmup_init_lr",
                    "optim.end_lr_ratio")  # fmt: skip
_DATA_FIELDS = ("data.train_files", "data.sources", "data.vecap_prob")


def _with_defaults(saved: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """`saved` with the fields it lacks taken from `base` (the defaults), section by section."""
    out = dict(saved)
    for key, value in base.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict) and key not in ("evals", "sources"):
            out[key] = _with_defaults(out[key], value)
    return out


def _under(field: str, sections: tuple[str, ...]) -> bool:
    return any(field == f"config.{s}" or field.startswith(f"config.{s}.") for s in sections)


def check_saved_config(config: ml_collections.ConfigDict, meta: dict[str, Any], step: int) -> None:
    """Compares the config with the one that saved the checkpoint at `step`, before restoring it.

    A change the checkpoint cannot be restored into (the towers, the objective, the optimizer's
    layout) is refused naming the fields: it is the config's, not damage to the checkpoint. A
    change of the learning-rate schedule or of the data is allowed, and logged.
    """
    saved = meta.get("config")
    if not saved:
        return
    # A field added to the schema since the checkpoint was saved had its default then.
    saved = _with_defaults(saved, json.loads(defaults.get_config().to_json_best_effort()))
    current = config.to_dict()
    changed = _changed(current, saved, "config")
    for section in _RESTORE_FIELDS:
        blocking = [f for f in changed if _under(f, (section,))]
        if blocking:
            what = ", ".join(f"{f} {_get(saved, f)!r} -> {_get(current, f)!r}" for f in blocking)
            raise ConfigError(
                f"config.{section} differs from the run that saved the checkpoint at step {step} in this "
                f"workdir ({what}): its parameters or optimizer state cannot take the change. Resume with "
                "the saved values, or start a new workdir (config.init_from can start from this one)"
            )
    schedule = [f for f in changed if _under(f, _SCHEDULE_FIELDS)]
    if schedule:
        then = learning_rate_schedule(ml_collections.ConfigDict(saved["optim"]), saved["total_steps"])
        now = learning_rate_schedule(config.optim, config.total_steps)
        log.warning(
            "RESUMING WITH A NEW LEARNING-RATE SCHEDULE: %s changed since step %d; the learning rate at "
            "step %d is now %.3g (it would have been %.3g). Rerun with the saved values to keep the "
            "schedule", ", ".join(f"{f} {_get(saved, f)} -> {_get(current, f)}" for f in schedule),
            step, step, float(now(step)), float(then(step)),
        )  # fmt: skip
    for f in changed:
        if _under(f, _DATA_FIELDS):
            log.warning("resuming with %s changed since step %d: %s -> %s", f, step, _get(saved, f),
                        _get(current, f))  # fmt: skip


def _get(section: Any, dotted: str) -> Any:
    """The value of a dotted config field (`config.optim.learning_rate`) in a config's dict, or None."""
    for part in dotted.split(".")[1:]:
        section = section.get(part) if isinstance(section, dict) else None
    return section
