"""AdamW with decoupled, masked weight decay; warmup + cosine; global-norm clipping.

Gradient accumulation is not done here (optax.MultiSteps would average
micro-batch gradients, each computed with its own micro-batch's negatives,
which is *not* the large-batch CLIP gradient). The train step accumulates
instead, exactly: see veclip_jax/train/step.py.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

# Parameter-name fragments that get no weight decay: biases, LayerNorm
# scales/biases, the class token, position tables and the temperature.
NO_DECAY = ("bias", "scale", "class_embedding", "position_embedding", "logit_scale")


def learning_rate_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from `warmup_init_lr` (default 0) to the peak over `warmup_steps`, then cosine
    to `end_lr_ratio * peak`.

    The cosine reaches its floor at `total_steps` and stays there. A non-zero
    warm-up start is the DeCLIP toolkit's `base_lr` (its recipes warm up from 1e-4).
    """
    peak = optim_cfg.learning_rate
    warmup = optim_cfg.warmup_steps
    if not 0 <= warmup < total_steps:
        raise ValueError(f"config.optim.warmup_steps={warmup} must lie in [0, total_steps={total_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=float(optim_cfg.get("warmup_init_lr", 0.0)),
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=peak * optim_cfg.end_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: kernels, the token table and projections."""

    def decays(path: tuple, _: Any) -> bool:
        names = [getattr(k, "key", str(k)) for k in path]
        return not any(frag in name for name in names for frag in NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked decoupled decay)."""
    tx = optax.adamw(
        learning_rate=learning_rate_schedule(optim_cfg, total_steps),
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=decay_mask,
    )
    if optim_cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), tx)
    return tx
