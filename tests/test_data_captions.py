"""VeCLIP caption mixing: the VeCap rate, determinism, fallbacks, cleaning."""

from __future__ import annotations

import math

import numpy as np
import pytest

from veclip_jax.data import captions, seeds
from veclip_jax.data.captions import ALT, VECAP


def _vecap_rate(p: float, *, seed: int = 0, epochs: int = 4, n: int = 5000) -> float:
    draws = [
        captions.draws_vecap(seed=seed, epoch=e, index=i, vecap_prob=p)
        for e in range(epochs)
        for i in range(n)
    ]
    return float(np.mean(draws))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mixing_honours_vecap_prob_within_sampling_error(p):
    n = 4 * 5000
    rate = _vecap_rate(p)
    # 5 standard errors: a false failure about once in 3.5 million runs.
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), rate


def test_vecap_prob_zero_is_altText_only_and_one_is_vecap_only():
    assert _vecap_rate(0.0, n=2000) == 0.0
    assert _vecap_rate(1.0, n=2000) == 1.0


def test_draws_are_a_fixed_function_of_seed_epoch_and_index():
    # Recorded values (tests/test_data_seeds.py pins the hash beneath): the same on any machine.
    draws = [captions.draws_vecap(seed=7, epoch=3, index=i, vecap_prob=0.5) for i in range(16)]
    assert "".join("1" if d else "0" for d in draws) == "1001001010110100"
    assert captions.draws_vecap(seed=7, epoch=3, index=1, vecap_prob=0.5) is False
    # A draw is VeCap exactly when its uniform lies below vecap_prob.
    u = seeds.example_uniform(7, seeds.STREAM_CAPTION, 3, 0)
    assert captions.draws_vecap(seed=7, epoch=3, index=0, vecap_prob=u) is False
    assert captions.draws_vecap(seed=7, epoch=3, index=0, vecap_prob=min(1.0, u + 1e-12)) is True


def test_draws_are_redrawn_each_epoch_and_for_each_seed():
    def draws(seed, epoch):
        return np.array(
            [captions.draws_vecap(seed=seed, epoch=epoch, index=i, vecap_prob=0.5) for i in range(4000)]
        )

    base = draws(0, 0)
    # Independent fair coins agree half the time; a reused draw would agree always.
    for other in (draws(0, 1), draws(1, 0)):
        agree = float(np.mean(base == other))
        assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / 4000), agree


def test_record_missing_one_caption_uses_the_other():
    for i in range(50):
        c = captions.choose_caption(None, "full description", vecap_prob=0.0, seed=0, epoch=0, index=i)
        assert (c.text, c.field, c.drawn) == ("full description", VECAP, ALT)
        c = captions.choose_caption(" \t ", "full", vecap_prob=0.0, seed=0, epoch=0, index=i)
        assert c.field == VECAP
        c = captions.choose_caption("web text", None, vecap_prob=1.0, seed=0, epoch=0, index=i)
        assert (c.text, c.field, c.drawn) == ("web text", ALT, VECAP)


def test_record_with_both_captions_empty_gives_no_text():
    c = captions.choose_caption("\u200b\n", None, vecap_prob=0.5, seed=0, epoch=0, index=0)
    assert c.text == "" and c.field == ""


def test_choice_follows_the_draw_when_both_captions_exist():
    for i in range(200):
        c = captions.choose_caption("alt", "vecap", vecap_prob=0.5, seed=3, epoch=1, index=i)
        expected = VECAP if captions.draws_vecap(seed=3, epoch=1, index=i, vecap_prob=0.5) else ALT
        assert c.field == c.drawn == expected
        assert c.text == ("vecap" if expected == VECAP else "alt")


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  a red\tcircle \n on white  ", "a red circle on white"),
        ("cats &amp; dogs", "cats & dogs"),
        ("zero\u200bwidth\ufeff and\x00 nul\x07", "zerowidth and nul"),
        ("line\u2028sep\u00a0nbsp", "line sep nbsp"),
        ("naïve café ✓", "naïve café ✓"),
        ("", ""),
        (None, ""),
    ],
)
def test_clean_caption_fixes_whitespace_entities_and_control_characters(raw, clean):
    assert captions.clean_caption(raw) == clean


def test_vecap_prob_outside_unit_interval_is_an_error():
    with pytest.raises(ValueError, match="vecap_prob"):
        captions.draws_vecap(seed=0, epoch=0, index=0, vecap_prob=1.5)
