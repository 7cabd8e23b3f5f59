"""The one typed checker: a section of fields against the defaults that define it.

Three kinds of config data are checked the same way: the experiment config
against veclip_jax/defaults.py (config.py), an evaluation entry against its
task type's fields (eval/registry.py), and an objective's sub-section against
its dataclass's fields (objectives/__init__.py `make_objective`). Each field's
type is its default's (an int may stand for a float, never a bool for an
int); an unknown field is refused with the closest known one suggested (a
typo would otherwise be silently ignored); a range check names its rule.
Every error names the full dotted field, as the user writes it:

    config.objective.declip.queue_size=0: must be a whole number >= 1

Plain Python (no JAX): the command-line tools check a config before JAX starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import ml_collections

from veclip_jax.errors import ConfigError

# A range rule: (dotted field below the section, predicate, why a value fails).
Check = tuple[str, Callable[[Any], bool], str]

# Integer fields end up in int32 arrays (step counters, seeds): anything wider overflows later.
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def is_section(x: Any) -> bool:
    """A nested section (ConfigDict or dict), as opposed to a leaf value."""
    return isinstance(x, ml_collections.ConfigDict | Mapping)


def type_ok(value: Any, default: Any) -> bool:
    """`value` has the type of `default` (None: anything; int for float; list for tuple)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))


def suggestion(key: str, known: Iterable[Any]) -> str | None:
    """The known name closest to a misspelt `key`, or None."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    return close[0] if close else None


def check_section(
    values: Any,
    schema: Mapping[str, Any],
    where: str,
    *,
    unknown: str,
    missing: str | None = None,
    free_form: Collection[str] = (),
) -> None:
    """Refuses a field of `values` that `schema` (name -> default) lacks, or of another type.

    `where` is the section's dotted name ("config", "config.evals.NAME");
    `unknown` ends the message for an unknown field ("is not a field of ...").
    With `missing`, every field of the schema is required (the message says
    why); without, absent fields take their defaults. Sub-sections are checked
    recursively, except those named in `free_form` (dotted, below `where`):
    their keys are data, checked by their owner.
    """
    for key in values:
        if key not in schema:
            close = suggestion(key, schema)
            hint = f" (did you mean {where}.{close}?)" if close else ""
            raise ConfigError(f"{where}.{key} {unknown}{hint}")
    for key, default in schema.items():
        name = f"{where}.{key}"
        if key not in values:
            if missing is not None:
                raise ConfigError(f"{name} is missing ({missing})")
            continue
        value = values[key]
        if is_section(default):
            if not is_section(value):
                raise ConfigError(f"{name} must be a section (dict), got {value!r}")
            if key not in free_form:
                inner = {f[len(key) + 1 :] for f in free_form if f.startswith(f"{key}.")}
                check_section(value, default, name, unknown=unknown, missing=missing, free_form=inner)
        elif not type_ok(value, default):
            want, got = type(default).__name__, type(value).__name__
            raise ConfigError(f"{name}={value!r}: expected {want}, got {got}")
        elif isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
            raise ConfigError(f"{name}={value}: an integer field must lie in [{INT_MIN}, {INT_MAX}]")


def get(values: Any, dotted: str) -> Any:
    """The field `dotted` ("model.vision.width") of a section."""
    for part in dotted.split("."):
        values = values[part]
    return values


def check_ranges(values: Any, checks: Iterable[Check], where: str) -> None:
    """Refuses the first field whose value fails its rule (a rule that raises counts as failed)."""
    for field, ok, why in checks:
        value = get(values, field)
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"{where}.{field}={value!r}: {why}")
