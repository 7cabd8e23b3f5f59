"""The mesh follows the devices' physical layout, or refuses: no silent fall-back to enumeration order."""

from __future__ import annotations

import jax
import pytest

from veclip_jax.parallel import mesh as mesh_lib


def test_mesh_covers_the_given_devices_in_the_configured_shape():
    devices = jax.devices()[:4]
    m = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=1), devices)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in devices)


def test_a_shape_the_topology_cannot_hold_is_an_error_naming_the_field(monkeypatch):
    def refuses(*args, **kwargs):
        raise ValueError("cannot fit the physical topology")

    monkeypatch.setattr(mesh_lib.jax, "make_mesh", refuses)
    with pytest.raises(ValueError, match=r"config\.mesh=\{'data': 2, 'fsdp': 4, 'tensor': 1\}.*physical"):
        mesh_lib.make_mesh(dict(data=2, fsdp=4, tensor=1))


def test_the_mesh_is_built_over_the_axis_names_of_parallel_axes():
    from veclip_jax.parallel.axes import BATCH_AXES, MESH_AXES

    m = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    assert tuple(m.axis_names) == MESH_AXES and set(BATCH_AXES) <= set(MESH_AXES)
