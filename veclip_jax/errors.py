"""Errors the user fixes, as opposed to bugs.

The command-line tools turn a `UserError` into one line on stderr and exit
code 2, with no traceback: it names the thing to change (a config field, a
path, a workdir). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, paths, data, workdir): exit 2, one line."""


class ConfigError(UserError, ValueError):
    """A config field that is unknown, missing, of the wrong type or out of range.

    Here rather than in veclip_jax/config.py so that what raises it outside the
    config check (the workdir's tokenizer check) need not import the checker.
    """


class WorkdirBusyError(UserError):
    """Another live trainer holds the workdir's lock."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read (damaged, missing), named with its path."""


class LayoutError(UserError, ValueError):
    """A mesh shape the devices' physical topology cannot hold."""


class TokenizerError(UserError, ValueError):
    """config.data.tokenizer is not a tokenizer this model can use (the message names it and why)."""
