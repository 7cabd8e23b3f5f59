"""The device mesh from `config.mesh`, and multi-host start-up."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from veclip_jax.parallel.rules import MESH_AXES


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
    """Resolves `config.mesh` (one -1 allowed: the devices left) to a shape.

    Raises ValueError naming the field when the sizes do not fit the devices.
    """
    sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
    free = [name for name, s in zip(MESH_AXES, sizes, strict=True) if s == -1]
    bad = [name for name, s in zip(MESH_AXES, sizes, strict=True) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"config.mesh.{bad[0]}={mesh_cfg[bad[0]]}: an axis size is a positive int or -1")
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh.{free[0]}=-1: the other axes' product ({fixed}) "
                f"does not divide the {num_devices} devices"
            )
        sizes[MESH_AXES.index(free[0])] = num_devices // fixed
    elif fixed != num_devices:
        shape = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(f"config.mesh={shape} covers {fixed} devices, but there are {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes (GSPMD propagation).

    `jax.make_mesh` orders the devices by the physical topology (ICI rings on
    TPU), so the fastest links serve the innermost axis (tensor).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except (ValueError, NotImplementedError):
        # A subset of devices that make_mesh cannot lay out physically.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_per_shard(mesh: Mesh, global_batch: int) -> int:
    """Examples per batch shard; raises if the batch does not split evenly."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise ValueError(
            f"config.batch_size={global_batch} does not divide over data x fsdp = {shards} batch shards"
        )
    return global_batch // shards


def initialize_distributed() -> None:
    """Joins the other hosts of a multi-host job (TPU pod slice, GPU cluster).

    On Cloud TPU and under SLURM/Open MPI, JAX finds the coordinator itself;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    Call it before any other JAX work. A single process needs no call.
    """
    jax.distributed.initialize()
