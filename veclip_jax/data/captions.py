"""Caption choice: VeCLIP's mixing of AltText and VeCap, and light caption cleaning.

VeCLIP trains on a mix of the two texts of each image: every time an image is
visited (per example, per epoch) its text is the VeCap caption with
probability `vecap_prob`, else the AltText. 0 is the CLIP baseline on
AltTexts, 1 trains on VeCap only, 0.5 is VeCLIP. The draw is a pure function
of (seed, epoch, record index), so it does not depend on the worker, the
host count or a restart.

A record missing one caption (None, or empty after cleaning) uses the other;
the draw is still made, so the fraction of VeCap among records that have both
texts stays `vecap_prob`.
"""

from __future__ import annotations

import dataclasses
import html
import unicodedata

from veclip_jax.data import seeds

ALT = "alt_text"
VECAP = "vecap_text"

# Whitespace-like categories become a space; other invisible ones are dropped.
_SPACE_CATEGORIES = {"Cc", "Zs", "Zl", "Zp"}
_DROP_CATEGORIES = {"Cf", "Cs", "Co", "Cn"}


def clean_caption(text: str | None) -> str:
    """Light cleaning: HTML entities, control/invisible characters, whitespace.

    Web AltTexts carry `&amp;`, tabs, newlines, zero-width spaces and the odd
    control byte; none of it is content, and sentencepiece would spend pieces
    on it. Anything beyond this (spelling, casing, boilerplate filters) is a
    dataset decision, not the loader's.
    """
    if not text:
        return ""
    if "&" in text:
        text = html.unescape(text)
    if not text.isprintable():  # fast path: most captions are printable already
        chars = []
        for ch in text:
            cat = unicodedata.category(ch)
            if cat in _SPACE_CATEGORIES:
                chars.append(" ")
            elif cat not in _DROP_CATEGORIES:
                chars.append(ch)
        text = "".join(chars)
    return " ".join(text.split())


def draws_vecap(*, seed: int, epoch: int, index: int, vecap_prob: float) -> bool:
    """Whether record `index` reads its VeCap caption in `epoch` (before fallbacks)."""
    if not 0.0 <= vecap_prob <= 1.0:
        raise ValueError(f"vecap_prob must be in [0, 1], got {vecap_prob}")
    return seeds.example_uniform(seed, seeds.STREAM_CAPTION, epoch, index) < vecap_prob


@dataclasses.dataclass(frozen=True)
class CaptionChoice:
    """The text used for one visit of a record; `field` is ALT, VECAP or "" (none usable)."""

    text: str
    field: str
    drawn: str  # what the coin said before the missing-caption fallback


def choose_caption(
    alt_text: str | None,
    vecap_text: str | None,
    *,
    vecap_prob: float,
    seed: int,
    epoch: int,
    index: int,
) -> CaptionChoice:
    """Picks and cleans the caption of record `index` for `epoch` (VeCLIP mixing)."""
    drawn = VECAP if draws_vecap(seed=seed, epoch=epoch, index=index, vecap_prob=vecap_prob) else ALT
    raw = {ALT: alt_text, VECAP: vecap_text}
    other = ALT if drawn == VECAP else VECAP
    for field in (drawn, other):  # the other one is cleaned only when needed
        text = clean_caption(raw[field])
        if text:
            return CaptionChoice(text, field, drawn)
    return CaptionChoice("", "", drawn)
