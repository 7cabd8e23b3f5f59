"""The torch baselines of veclip_jax.bench.torch_step run and report (tiny towers; timings are not tested)."""

from __future__ import annotations

import math
import os
import re

import pytest

from tests.openclip_ref import available
from veclip_jax import defaults
from veclip_jax.bench import torch_step


def _fields(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^(\w[\w ()/]*?)\s{2,}(.+)$", text, re.M)}


def test_open_clips_resnet_step_runs_in_a_process_of_its_own():
    if why := available():
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    config = defaults.get_config("RN-tiny")
    config.batch_size = 2
    out = _fields(torch_step.run_open_clip(config, steps=1))
    assert out["model"].startswith("open_clip ") and "RN-tiny sizes" in out["model"], out
    assert out["global batch"] == "2" and "over 1 steps" in out["step (median)"]
    assert float(out["images/s"]) > 0 and math.isfinite(float(out["loss"]))


def test_the_hf_step_reports_the_same_lines():
    config = defaults.get_config("tiny")
    config.batch_size = 2
    out = _fields(torch_step.hf_step(config, steps=1))
    assert out["model"].startswith("HF CLIPModel, tiny sizes") and out["global batch"] == "2"
    assert {"step (median)", "images/s", "loss"} <= set(out)
