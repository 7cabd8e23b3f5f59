"""The one place where logical axis names meet mesh axes.

Models name their axes ("embed", "heads", "mlp", "vocab", "batch", ...); the
table `config.sharding_rules` (default: veclip_jax/defaults.py SHARDING_RULES,
config data like the mesh) says which mesh axis each is split over. Switching between data
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

from typing import Any

from jax.sharding import PartitionSpec as P

from veclip_jax.defaults import SHARDING_RULES
from veclip_jax.parallel.axes import BATCH_AXES

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = SHARDING_RULES


def rules_from_config(config: Any) -> LogicalRules:
    """`config.sharding_rules` as flax wants them (tuples; a JSON round trip gives lists)."""
    return tuple(
        (str(name), tuple(axes) if isinstance(axes, list | tuple) else axes)
        for name, axes in config.sharding_rules
    )


def batch_spec(ndim: int = 1) -> P:
    """PartitionSpec of a batch array: leading axis over data x fsdp, rest whole."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))
