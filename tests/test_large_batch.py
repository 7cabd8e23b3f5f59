"""Every objective's train step at a large global batch (issue 22, item 3).

CLIP runs at 64k pairs and SigLIP at up to 1M: no count or product of batch
sizes (pairs B(B-1), B*B, B*N) may reach JAX as an int32, which overflows
from B = 46,341 (`OverflowError ... 4294901760` while tracing the step). The
step of each objective is traced and lowered at a global batch of 131,072 on
ShapeDtypeStructs (nothing allocated, nothing compiled), on the 8 fake CPU
devices with the tiny towers, through the one assembly that trains,
compiles for a pod and benchmarks (train/assembly.py).
"""

from __future__ import annotations

import time

import jax
import pytest

from veclip_jax import defaults
from veclip_jax.objectives import OBJECTIVES
from veclip_jax.parallel.mesh import make_mesh
from veclip_jax.recipes.declip import tiny_objective
from veclip_jax.train.assembly import assemble

LARGE = 131_072  # > 46,341: B * (B - 1) and B * B (2**34) are past int32


def _lowered_step_text(name: str, batch_size: int, grad_accum_steps: int = 1) -> str:
    c = defaults.get_config("tiny")
    tiny_objective(c, name)  # DeCLIP's queue (4,096 rows, sharded over 8) takes a batch larger than itself
    c.batch_size = batch_size
    c.optim.grad_accum_steps = grad_accum_steps
    run = assemble(c, make_mesh(dict(data=-1, fsdp=1, tensor=1)))
    return run.step.lower(run.abstract_state(), run.abstract_batch(batch_size)).as_text()


def test_every_objectives_step_lowers_at_a_global_batch_of_131072():
    assert len(jax.devices()) == 8
    start = time.perf_counter()
    for name in OBJECTIVES:
        text = _lowered_step_text(name, LARGE)
        assert f"tensor<{LARGE}x" in text, name  # the batch really is that large
    assert time.perf_counter() - start < 120  # lowering only: seconds, not a compile


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_clip_and_siglip_lower_at_a_million_pairs(name):
    assert f"tensor<{2**20}x" in _lowered_step_text(name, 2**20)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_the_gradient_cache_step_lowers_at_a_global_batch_of_131072(name):
    assert f"tensor<{LARGE}x" in _lowered_step_text(name, LARGE, grad_accum_steps=4)
