"""The one place where logical axis names meet mesh axes.

Models name their axes ("embed", "heads", "mlp", "vocab", "batch", ...); this
table says which mesh axis each is split over. Switching between data
parallelism, FSDP and tensor parallelism is then a change of `config.mesh`
alone: an axis of size 1 shards nothing.

- batch:  the examples, over data x fsdp (every device holds a slice).
- embed:  the model width of *parameters* (and so of optimizer state) over
          fsdp; XLA gathers a layer's weights when it needs them (ZeRO-3).
- heads, mlp, vocab: over tensor (Megatron-style splits).
- act_embed: the width of *activations*; left whole so that a batch sharded
          over fsdp is not re-split on its features.
- act_mlp: the MLP hidden activations, over tensor, following their weights.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_mlp", "tensor"),
    ("act_embed", None),
    ("length", None),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("positions", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("proj", None),
)


def batch_spec(ndim: int = 1) -> P:
    """PartitionSpec of a batch array: leading axis over data x fsdp, rest whole."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))
