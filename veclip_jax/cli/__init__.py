"""Command-line entry points: `launch/*.py` and the console scripts of pyproject.toml call these."""

from __future__ import annotations

import logging
from collections.abc import Sequence


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own arguments, the trainer's `--config.X=...` overrides after a `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


class OneLineFromLibraries(logging.Filter):
    """Library records (Orbax's, asyncio's, on a failed background save) in one line, each once.

    A save that fails on a full disk makes Orbax log the error with its traceback from every writer
    thread, and asyncio one "Task exception was never retrieved" per failed write (as many as the
    garbage collector finds); our own one line (the directory, the free space, the intact
    checkpoint) says it all. A library line already printed is not printed again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("veclip_jax") or not record.exc_info or record.exc_info[0] is None:
            return True
        line = f"{record.getMessage().splitlines()[0]} ({record.exc_info[0].__name__})"
        record.msg, record.args, record.exc_info, record.exc_text = line, None, None, None
        if (record.name, line) in self._seen:
            return False
        self._seen.add((record.name, line))
        return True
