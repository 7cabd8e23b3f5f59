"""The train state, initialised directly sharded over the mesh."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from veclip_jax.objectives.model import (
    ObjectiveModel,
    abstract_model_state,
    abstract_params,
    init_variables,
    param_logical_specs,
)
from veclip_jax.parallel.mesh import replicated
from veclip_jax.parallel.rules import DEFAULT_RULES, LogicalRules


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied
    params: Any
    opt_state: Any
    nonfinite_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss/gradient
    # The objective's own state (DeCLIP's text queue; objectives/base.py), {} for most objectives.
    objective_state: Any = flax.struct.field(default_factory=dict)
    # The towers' non-trained variables (objectives/model.py MODEL_STATE): a ResNet's BatchNorm
    # running averages {"batch_stats": ...}, updated by every applied step; {} for a ViT.
    model_state: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ShardedInit:
    """What `init_train_state` gives: the state and the shardings it lives in."""

    state: TrainState
    shardings: TrainState  # same tree, NamedSharding leaves


def state_shardings(
    model: ObjectiveModel, tx: optax.GradientTransformation, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> TrainState:
    """NamedShardings for every leaf of the train state, from the logical rules.

    Optimizer moments follow their parameter; scalars (counts) are replicated;
    the objective's state follows the logical axes it declares; the model state (BatchNorm running
    averages, a few thousand floats per layer) is replicated.
    """
    param_sh = nn.logical_to_mesh_sharding(param_logical_specs(model), mesh, rules)
    rep = replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params(model))
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: rep
    )
    axes = model.spec.state_axes()
    objective_sh = {k: nn.logical_to_mesh_sharding(P(*v), mesh, rules) for k, v in axes.items()}
    model_sh = jax.tree.map(lambda _: rep, abstract_model_state(model))
    return TrainState(
        step=rep,
        params=param_sh,
        opt_state=opt_sh,
        nonfinite_steps=rep,
        objective_state=objective_sh,
        model_state=model_sh,
    )


def init_train_state(
    model: ObjectiveModel,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    rules: LogicalRules = DEFAULT_RULES,
) -> ShardedInit:
    """Initialises parameters and optimizer state where they live: each device
    creates only its shards (no host copy, no replicated intermediate)."""
    shardings = state_shardings(model, tx, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(_init_fn(model, tx), out_shardings=shardings)(rng)
    return ShardedInit(state=state, shardings=shardings)


def _init_fn(model: ObjectiveModel, tx: optax.GradientTransformation):
    def init(rng: jax.Array) -> TrainState:
        params, model_state = init_variables(model, rng)
        params = nn.unbox(params)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero,
            params=params,
            opt_state=tx.init(params),
            nonfinite_steps=zero,
            objective_state=model.spec.init_state(jax.random.fold_in(rng, 1), model.dims),
            model_state=model_state,
        )

    return init


def abstract_train_state(
    model: ObjectiveModel, tx: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """The train state as ShapeDtypeStructs placed by `shardings`: a restore target, nothing allocated."""
    shapes = jax.eval_shape(_init_fn(model, tx), jax.random.key(0))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
