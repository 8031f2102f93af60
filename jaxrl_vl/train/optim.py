"""Optimizer: optax AdamW with a learning-rate schedule and global-norm clipping.

Gradient accumulation is not an optimizer wrapper here: the SFT/RL steps scan over micro-batches
inside one jitted step and apply one update (see sft_step.py), so `step` always counts optimizer
updates and the schedule, checkpoints and metrics agree on what a step is.

Config fields (`config.optim`): learning_rate, schedule ("cosine" | "linear" | "constant"),
warmup_steps, end_learning_rate_fraction, weight_decay, b1, b2, eps, max_grad_norm (0 = off).
"""
from __future__ import annotations

import jax

from jaxrl_vl.train.config_overrides import ConfigError
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup to learning_rate over warmup_steps (from learning_rate / warmup_steps), then decay to
    learning_rate * end_learning_rate_fraction at total_steps (cosine or linear) or stay constant."""
    peak = float(optim_config.learning_rate)
    warmup = int(optim_config.warmup_steps)
    end = peak * float(optim_config.end_learning_rate_fraction)
    kind = optim_config.schedule
    if kind not in SCHEDULES:
        raise ConfigError(f"optim.schedule={kind!r}; choose one of {SCHEDULES}")
    if warmup < 0 or warmup > total_steps:
        raise ConfigError(f"optim.warmup_steps={warmup} must be in [0, total steps={total_steps}]")
    decay_steps = max(total_steps - warmup, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    # warmup: step s < warmup uses peak * (s + 1) / warmup (the first update is not wasted at lr 0)
    ramp = optax.linear_schedule(peak / warmup, peak, max(warmup - 1, 1))
    return optax.join_schedules([ramp, decay], [warmup])


def _decay_mask(params):
    """Weight decay on matrices only (not norms, biases or scalars), the usual AdamW practice."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(optim_config, total_steps: int, moment_dtype=None) -> tuple[optax.GradientTransformation,
                                                                                optax.Schedule]:
    """-> (optimizer, schedule). Apply to whatever tree is trained (full params or the LoRA tree).
    moment_dtype: AdamW's first moment (None: the trained tree's dtype); the second moment always follows the
    trained tree's dtype (train/precision.py)."""
    schedule = learning_rate_schedule(optim_config, total_steps)
    parts = []
    if float(optim_config.max_grad_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim_config.max_grad_norm)))
    parts.append(optax.adamw(schedule, b1=float(optim_config.b1), b2=float(optim_config.b2),
                             eps=float(optim_config.eps), weight_decay=float(optim_config.weight_decay),
                             mask=_decay_mask, mu_dtype=moment_dtype))
    return optax.chain(*parts), schedule
