"""Command-line entry points: `launch/*.py` and the console scripts of pyproject.toml call these."""

from __future__ import annotations

from collections.abc import Sequence


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own arguments, the trainer's `--config.X=...` overrides after a `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]
