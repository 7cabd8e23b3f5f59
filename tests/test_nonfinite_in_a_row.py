"""`config.max_nonfinite_steps` counts skipped steps IN A ROW: a good step in between starts the count
again, however many steps were skipped in all (veclip_jax/train/loop.py, the monitor's streak).

Non-finite steps are made as tests/test_loop.py makes them: the batches of chosen steps get NaN
images, so their loss is NaN and the step skips its update.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import tiny_run_config
from veclip_jax.run.workdir import read_jsonl
from veclip_jax.train import loop

LIMIT = 3


def _nan_at(monkeypatch, bad_steps: set[int]) -> None:
    """Makes the batches of `bad_steps` (1-based, a fresh run) all-NaN images."""
    original, calls = loop.global_batch, []

    def maybe_nan(mesh, local):
        calls.append(1)
        if len(calls) in bad_steps:
            local = dict(local, image=np.full(local["image"].shape, np.nan, np.float32))
        return original(mesh, local)

    monkeypatch.setattr(loop, "global_batch", maybe_nan)


def _config(demo_cache: str, total_steps: int):
    return tiny_run_config(
        demo_cache, total_steps=total_steps, eval_every=0, checkpoint_every=0, max_nonfinite_steps=LIMIT
    )


def test_skipped_steps_between_good_ones_never_stop_the_run(demo_cache, tmp_path, monkeypatch):
    bad = {2, 3, 5, 6, 8, 9}  # 6 skipped in all, twice the limit; at most LIMIT - 1 in a row
    _nan_at(monkeypatch, bad)
    result = loop.train(_config(demo_cache, total_steps=10), str(tmp_path))
    assert result.step == 10
    lines = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert lines[-1]["step"] == 10 and lines[-1]["nonfinite_steps"] == len(bad)


def test_the_limit_in_a_row_stops_the_run_at_its_last_step(demo_cache, tmp_path, monkeypatch):
    # One skipped step, a good one, then LIMIT in a row (steps 4-6): the stop comes at step 6, when
    # the third in a row fails, not at step 5, when the third in all does.
    _nan_at(monkeypatch, {2, 4, 5, 6})
    with pytest.raises(loop.NonFiniteTrainingError, match=rf"^{LIMIT} consecutive steps \(to step 6\)"):
        loop.train(_config(demo_cache, total_steps=10), str(tmp_path))
