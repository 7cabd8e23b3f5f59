"""The train step: one jitted function (state, batch) -> (state, metrics).

Gradient accumulation splits the batch into k micro-batches *inside* the step
and stays exact for the contrastive loss (the negatives are the whole batch):

  1. embed every micro-batch without keeping activations;
  2. compute the loss on the full batch of embeddings, and its gradient with
     respect to the embeddings and the temperature;
  3. re-run each micro-batch's towers and pull that embedding gradient back
     through them (a VJP), summing parameter gradients.

This is the "gradient cache" scheme (also open_clip's --accum-freq): memory
is that of one micro-batch, cost one extra forward pass, and the update equals
the large-batch update up to float round-off. Averaging micro-batch gradients
(optax.MultiSteps) would not: each would see only its own negatives.

The loss is the objective's (veclip_jax/objectives/base.py): the step
differentiates `objective(model.outputs(batch), batch, state) -> (loss,
metrics)` whatever it is (the model is the towers composed with that one
objective, veclip_jax/objectives/model.py), then advances the objective's state (DeCLIP's
queue) from the same outputs, outside the gradient. The gradient cache serves
objectives that read only the pooled embeddings and scalar parameters
(`pooled_only`: CLIP, SigLIP); their scalars (the temperature, objective/...)
get their gradient in step 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from veclip_jax.batch import FIELDS
from veclip_jax.objectives.base import OBJECTIVE_PARAMS
from veclip_jax.objectives.model import ObjectiveModel, apply_outputs
from veclip_jax.parallel.axes import BATCH_AXES
from veclip_jax.parallel.mesh import batch_sharding, replicated
from veclip_jax.parallel.rules import DEFAULT_RULES, LogicalRules
from veclip_jax.train.state import TrainState

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def _split(x: jax.Array, k: int, mesh: Mesh) -> jax.Array:
    """[B, ...] -> [k, B/k, ...], micro-batch j = examples j, j+k, j+2k, ...

    Strided, not contiguous, so every micro-batch keeps a slice on every
    device and no data moves.
    """
    y = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    spec = P(None, BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))


def _merge(y: jax.Array, mesh: Mesh) -> jax.Array:
    """Inverse of `_split`: [k, B/k, ...] -> [B, ...] in the original order."""
    x = jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:])
    spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# Metrics of the step itself: "learning_rate" is a gauge (its value at the step, not a mean);
# "step_applied" is bookkeeping for the loop (0 for a skipped non-finite step).
STEP_GAUGES = ("learning_rate",)
STEP_APPLIED = "step_applied"


def _inputs(batch: Batch, keys: tuple[str, ...]) -> Batch:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing} (it has {sorted(batch)}); the step reads {list(keys)}")
    return {k: batch[k] for k in keys}


def make_train_step(
    model: ObjectiveModel,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    *,
    grad_accum_steps: int = 1,
    rules: LogicalRules = DEFAULT_RULES,
    learning_rate_fn: optax.Schedule | None = None,
) -> StepFn:
    """Compiles-on-first-call `train_step(state, batch) -> (state, metrics)`.

    `batch` holds the keys the model's objective reads (`model.spec.inputs`,
    veclip_jax/batch.py: "image" [B, S, S, 3], "tokens" [B, L], "views"
    [B, V, S, S, 3], ...), global arrays sharded over data x fsdp; other keys
    are ignored. The state
    is donated: its buffers are reused for the new state. Metrics are
    replicated scalars. A non-finite loss or gradient leaves the parameters,
    optimizer state and objective state unchanged and counts the step in
    `state.nonfinite_steps`. The model's objective (`model.spec`) gives the
    loss and metrics. A ResNet's BatchNorm normalises with the statistics of the
    global batch (a mean over the sharded batch axis is the whole batch's, on any
    mesh) and its running averages (`state.model_state`) advance with every applied
    step; a skipped step leaves them unchanged too.
    """
    k = grad_accum_steps
    if k < 1:
        raise ValueError(f"config.optim.grad_accum_steps={k} must be >= 1")
    objective = model.spec
    if k > 1 and model.towers.stateful:
        raise ValueError(
            f"config.optim.grad_accum_steps={k}: the ResNet tower's BatchNorm statistics would be "
            "each micro-batch's, not the batch's; use 1"
        )
    if k > 1 and not objective.pooled_only:
        raise ValueError(
            f"config.optim.grad_accum_steps={k}: objective {objective.name!r} does not support exact "
            "gradient accumulation (it needs more than pooled embeddings); use 1"
        )
    scale_max = model.towers.logit_scale_max
    batch_keys = objective.inputs

    def apply(params: Any, images: jax.Array, tokens: jax.Array) -> dict[str, Any]:
        return model.apply({"params": params}, images, tokens)

    def grads_full_batch(
        params: Any, batch: Batch, obj_state: Any, model_state: Any
    ) -> tuple[Any, dict[str, jax.Array], Any, Any]:
        def loss_fn(p: Any) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any, Any]]:
            outputs, new_model_state = apply_outputs(model, p, model_state, batch)
            loss, metrics = objective(outputs, batch, mesh=mesh, state=obj_state)
            return loss, (metrics, outputs, new_model_state)

        (_, (metrics, outputs, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_obj_state = objective.next_state(jax.lax.stop_gradient(outputs), obj_state)
        return grads, metrics, new_obj_state, new_model_state

    def grads_accumulated(
        params: Any, batch: Batch, obj_state: Any, model_state: Any
    ) -> tuple[Any, dict[str, jax.Array], Any, Any]:
        micro = jax.tree.map(lambda x: _split(x, k, mesh), batch)

        def embed(p: Any, mb: Batch) -> tuple[jax.Array, jax.Array]:
            out = apply(p, mb["image"], mb["tokens"])
            return out["image_embeds"], out["text_embeds"]

        img_m, txt_m = jax.lax.map(lambda mb: embed(params, mb), micro)
        img, txt = _merge(img_m, mesh), _merge(txt_m, mesh)

        # The objective's scalars: the model's temperature and its own parameters, as the model
        # outputs them (objectives/model.py), so their gradient comes with the embeddings'.
        own = params.get(OBJECTIVE_PARAMS, {})

        def loss_from_embeds(img, txt, raw_scale, own):
            scale = jnp.minimum(jnp.exp(raw_scale), scale_max)
            outputs = {"image_embeds": img, "text_embeds": txt, "logit_scale": scale}
            if own:
                outputs[OBJECTIVE_PARAMS] = own
            return objective(outputs, batch, mesh=mesh)

        (_, metrics), (g_img, g_txt, g_scale, g_own) = jax.value_and_grad(
            loss_from_embeds, argnums=(0, 1, 2, 3), has_aux=True
        )(img, txt, params["logit_scale"], own)
        g_img_m, g_txt_m = _split(g_img, k, mesh), _split(g_txt, k, mesh)

        def accumulate(acc: Any, xs: tuple) -> tuple[Any, None]:
            mb, gi, gt = xs
            _, vjp = jax.vjp(lambda p: embed(p, mb), params)
            (g,) = vjp((gi, gt))
            return jax.tree.map(jnp.add, acc, g), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(accumulate, zeros, (micro, g_img_m, g_txt_m))
        grads["logit_scale"] = grads["logit_scale"] + g_scale
        if own:
            grads[OBJECTIVE_PARAMS] = jax.tree.map(jnp.add, grads[OBJECTIVE_PARAMS], g_own)
        return grads, metrics, obj_state, model_state  # no model state: refused above

    compute_grads = grads_full_batch if k == 1 else grads_accumulated

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grads, metrics, obj_state, model_state = compute_grads(
            state.params, batch, state.objective_state, state.model_state
        )
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            objective_state=keep(obj_state, state.objective_state),
            model_state=keep(model_state, state.model_state),
        )
        metrics = dict(metrics, grad_norm=grad_norm, **{STEP_APPLIED: finite.astype(jnp.float32)})
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        return new_state, metrics

    rep = replicated(mesh)
    in_batch = {k: batch_sharding(mesh, FIELDS[k].ndim) for k in batch_keys}
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, in_batch),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        # Tracing reads the mesh and logical rules from context (the models'
        # activation constraints); after the first call this only dispatches.
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, _inputs(batch, batch_keys))

    def lower(state: TrainState, batch: Batch) -> jax.stages.Lowered:
        """The step lowered for these inputs (for .compile(), cost analysis), in the same context."""
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(state, _inputs(batch, batch_keys))

    step.lower = lower
    return step
