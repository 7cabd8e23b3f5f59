"""One rule for a caption cell, whoever reads it: the converter, or the trainer streaming a file.

Shared so that the same input gives the same captions converted and streamed:
bytes must be UTF-8 (no replacement characters slipped into a caption), a
string is kept as written (the loader cleans it), anything else is not a
caption. The caller counts a ValueError as "bad_caption" (data/skips.py).
"""

from __future__ import annotations

from typing import Any


def caption_text(value: Any) -> str | None:
    """A caption cell as text: None if missing; ValueError if it is bytes that are not UTF-8, or not text."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")  # UnicodeDecodeError is a ValueError
    if isinstance(value, str):
        return value
    raise ValueError(f"caption of type {type(value).__name__}")
