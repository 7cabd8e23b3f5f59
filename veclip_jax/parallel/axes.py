"""The device mesh's axis names, and the ones a batch is split over.

Plain Python (no JAX): the config defaults (veclip_jax/defaults.py SHARDING_RULES)
and the config check import these names, and they are read before JAX is
imported; the mesh (mesh.py), the sharding rules (rules.py), the train step and
the objectives' losses (their `shard_map` collectives run over BATCH_AXES) use
the same ones.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")
# Every example of a batch lives on one (data, fsdp) shard; the losses gather and sum over these.
BATCH_AXES = ("data", "fsdp")
