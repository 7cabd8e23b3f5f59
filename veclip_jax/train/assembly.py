"""A config on a mesh, assembled once: objective, model, optimizer, shardings and the train step.

The training loop trains with it, `launch/compile.py` compiles it for a TPU
pod (train/aot.py) and the step benchmark times it (bench/step.py), so what
is compiled for a pod or timed is, by construction, what trains. The config
is validated before (veclip_jax/config.py); nothing here re-checks it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from veclip_jax import batch as batch_schema
from veclip_jax.errors import ConfigError
from veclip_jax.objectives import Objective, make_objective
from veclip_jax.objectives.model import ObjectiveModel, abstract_params, build, param_logical_specs
from veclip_jax.parallel.mesh import batch_sharding
from veclip_jax.parallel.rules import LogicalRules, rules_from_config
from veclip_jax.train.optim import learning_rate_schedule, make_optimizer
from veclip_jax.train.state import TrainState, abstract_train_state, init_train_state, state_shardings
from veclip_jax.train.step import StepFn, make_train_step


@dataclasses.dataclass(frozen=True)
class Assembly:
    """Everything the train step is made of, for one config on one mesh."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: LogicalRules  # config.sharding_rules, as flax wants them
    objective: Objective  # made once from config.objective
    model: ObjectiveModel  # the towers of config.model with the objective's heads
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # the learning rate per step
    shardings: TrainState  # NamedSharding of every leaf of the train state
    step: StepFn  # train_step(state, batch) -> (state, metrics), jitted, state donated

    def abstract_state(self) -> TrainState:
        """The train state as placed ShapeDtypeStructs (a restore or compile target; nothing allocated)."""
        return abstract_train_state(self.model, self.tx, self.shardings)

    def init_state(self, rng: jax.Array) -> TrainState:
        """A fresh train state, each device creating only its shards."""
        return init_train_state(self.model, self.tx, self.mesh, rng, self.rules).state

    def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step takes (veclip_jax/batch.py keys of the objective), placed on the mesh."""
        shapes = batch_schema.shapes(
            self.objective.inputs, batch_size or self.config.batch_size, self.model.batch_dims
        )
        return {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(self.mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()
        }


def check_shardable(model: ObjectiveModel, mesh: Mesh, rules: LogicalRules) -> None:
    """Every parameter's sharded dimensions divide over their mesh axes, or ConfigError naming the axis.

    Checked from shapes alone (no memory), before a workdir is touched: JAX would otherwise stop at
    the first sharded initialisation with an IndivisibleError traceback (e.g. fsdp=6 on width 64).
    """
    specs = param_logical_specs(model)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    shapes = jax.tree.leaves(abstract_params(model))
    for (path, spec), shape in zip(flat_specs, shapes, strict=True):
        for dim, logical, axes in zip(shape.shape, spec, nn.logical_to_mesh_axes(spec, rules), strict=False):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                fields = " x ".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes)
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(
                    f"{fields} does not divide the parameter {name} (shape {tuple(shape.shape)}): its "
                    f"{dim}-wide '{logical}' axis is split over {'x'.join(axes)} (config.sharding_rules); "
                    "pick mesh sizes that divide the model's widths, or another sharding rule"
                )


def assemble(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    objective: Objective | None = None,
    unroll: bool = False,
) -> Assembly:
    """The train step of a validated `config` on `mesh` and what it is made of.

    `objective`: the one already made from config.objective (made here when
    None). `unroll` unrolls the layer scans (the same math; XLA's cost
    analysis then counts every layer, bench/step.py).
    """
    rules = rules_from_config(config)
    objective = make_objective(config.objective) if objective is None else objective
    model = build(config.model, objective, unroll=unroll)
    check_shardable(model, mesh, rules)
    tx = make_optimizer(config.optim, config.total_steps)
    schedule = learning_rate_schedule(config.optim, config.total_steps)
    shardings = state_shardings(model, tx, mesh, rules)
    step = make_train_step(
        model,
        tx,
        mesh,
        shardings,
        grad_accum_steps=config.optim.grad_accum_steps,
        rules=rules,
        learning_rate_fn=schedule,
    )
    return Assembly(config, mesh, rules, objective, model, tx, schedule, shardings, step)


def synthetic_batch(assembly: Assembly, batch_size: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Random host arrays of every key the step reads (benchmarks, tests): tokens end in end-of-text,
    mlm_labels are targets at ~15 % of the positions and -1 elsewhere."""
    rng = np.random.default_rng(seed)
    vocab, eos = assembly.model.towers.vocab_size, assembly.config.model.text.eos_id
    out = {}
    for k, x in assembly.abstract_batch(batch_size).items():
        shape, dtype = x.shape, x.dtype
        if dtype == np.uint8:  # image pixels (batch.py)
            v = rng.integers(0, 256, size=shape)
        elif k == "mlm_labels":
            v = np.where(rng.random(shape) < 0.15, rng.integers(3, vocab, shape), -1)
        elif np.issubdtype(dtype, np.integer):
            v = rng.integers(3, vocab, size=shape)
            v[:, -1] = eos
        else:
            v = rng.normal(size=shape)
        out[k] = v.astype(dtype)
    return out
