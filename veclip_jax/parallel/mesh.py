"""The device mesh from `config.mesh`, and how batches are laid out on it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from veclip_jax.errors import LayoutError
from veclip_jax.parallel.axes import MESH_AXES
from veclip_jax.parallel.rules import batch_spec


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
    TPU), so the fastest links serve the innermost axis (tensor). A shape the
    topology cannot hold is an error, not a silent fall-back to enumeration
    order (which would route collectives over slow links).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    slices = int(mesh_cfg.get("slices", 1))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        if slices > 1:  # multislice: the data axis crosses slices (DCN); the rest stays in a slice (ICI)
            if shape[0] % slices:
                raise ValueError(f"config.mesh.data={shape[0]} is not a multiple of mesh.slices={slices}")
            ici = (shape[0] // slices, *shape[1:])
            grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
            return Mesh(grid, MESH_AXES, axis_types=axis_types)
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError) as e:
        layout = dict(zip(MESH_AXES, shape, strict=True))
        raise LayoutError(
            f"config.mesh={layout}: {len(devices)} {devices[0].device_kind} devices cannot be laid out in "
            f"this shape along their physical links ({e}); choose axis sizes that follow the topology"
        ) from e


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device holds whole."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array of rank `ndim`: examples over data x fsdp."""
    return NamedSharding(mesh, batch_spec(ndim))


def global_batch(mesh: Mesh, local: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over data x fsdp.

    Every process passes its own slice (same shapes on every process); its
    rows fill the batch positions held by its devices. One process: the local
    batch is the global one. No data crosses hosts.
    """
    out = {}
    for name, x in local.items():
        x = np.asarray(x)
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, shape)
    return out
