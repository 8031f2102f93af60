"""Tinker's built-in `loss_fn`s, exactly as its docs define them (notes/tinker.md, "Loss functions").

Per datum, inputs are (N,) arrays; here any shape works (the server pads datums into [B, N] and
passes `valid_mask` = 0 on padding). Every function returns the ELEMENTWISE loss (same shape);
Tinker's loss is its SUM over tokens and datums (metric `loss:sum`); no averaging anywhere.
  target_logprobs    log p_theta(target token) from the trainer (carries the gradient)
  weights            cross_entropy only: float, may be negative (forward_backward_custom sends
                     -dLoss/dlogp as weights)
  sampling_logprobs  `logprobs` from loss_fn_inputs: log q(token) under the sampler
  advantages         per-token advantages
  loss_fn_config     dict from the request (may be None): clip_low_threshold /
                     clip_high_threshold are RATIO bounds (not epsilons); beta for dro.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_vl.losses.aggregate import masked
from jaxrl_vl.losses.registry import TINKER_LOSSES

# Defaults when loss_fn_config leaves a key out. ppo: the docs' fixed eps = 0.2. cispo: the docs'
# one-sided clip (no lower bound, cap 4). dro: beta is not documented; 0.05 is the docs' example.
DEFAULT_LOSS_FN_CONFIG = {
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
    "cross_entropy": {},
    "importance_sampling": {},
}


def resolve_loss_fn_config(loss_fn: str, loss_fn_config: dict | None) -> dict[str, float]:
    """Merge the request's loss_fn_config over the defaults; unknown keys are a user error."""
    TINKER_LOSSES.get(loss_fn)
    defaults = DEFAULT_LOSS_FN_CONFIG[loss_fn]
    given = dict(loss_fn_config or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"loss_fn_config keys {unknown} are not used by loss_fn {loss_fn!r}; "
                         f"valid keys: {sorted(defaults)}")
    return {**defaults, **{k: float(v) for k, v in given.items()}}


def _ratio(target_logprobs, sampling_logprobs):
    return jnp.exp(target_logprobs - sampling_logprobs)


@TINKER_LOSSES.register("cross_entropy")
def cross_entropy(target_logprobs, weights, valid_mask=None, **_):
    """-logp * w."""
    loss = -target_logprobs * weights
    return loss if valid_mask is None else masked(loss, valid_mask)


@TINKER_LOSSES.register("importance_sampling")
def importance_sampling(target_logprobs, sampling_logprobs, advantages, valid_mask=None, **_):
    """-exp(logp - q) * A."""
    loss = -_ratio(target_logprobs, sampling_logprobs) * advantages
    return loss if valid_mask is None else masked(loss, valid_mask)


@TINKER_LOSSES.register("ppo")
def ppo(target_logprobs, sampling_logprobs, advantages, valid_mask=None, *,
        clip_low_threshold=0.8, clip_high_threshold=1.2, **_):
    """-min(r A, clip(r, lo, hi) A)."""
    ratio = _ratio(target_logprobs, sampling_logprobs)
    clipped = jnp.clip(ratio, clip_low_threshold, clip_high_threshold)
    loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    return loss if valid_mask is None else masked(loss, valid_mask)


@TINKER_LOSSES.register("cispo")
def cispo(target_logprobs, sampling_logprobs, advantages, valid_mask=None, *,
          clip_low_threshold=0.0, clip_high_threshold=4.0, **_):
    """-sg(clip(r, lo, hi)) * logp * A."""
    ratio = _ratio(target_logprobs, sampling_logprobs)
    clipped = jax.lax.stop_gradient(jnp.clip(ratio, clip_low_threshold, clip_high_threshold))
    loss = -clipped * target_logprobs * advantages
    return loss if valid_mask is None else masked(loss, valid_mask)


@TINKER_LOSSES.register("dro")
def dro(target_logprobs, sampling_logprobs, advantages, valid_mask=None, *, beta=0.05, **_):
    """-(logp * A - 0.5 beta (logp - q)^2)."""
    quadratic = jnp.square(target_logprobs - sampling_logprobs)
    loss = -(target_logprobs * advantages - 0.5 * beta * quadratic)
    return loss if valid_mask is None else masked(loss, valid_mask)


def tinker_loss(loss_fn: str, target_logprobs: jax.Array, loss_fn_inputs: dict,
                loss_fn_config: dict | None = None, valid_mask: jax.Array | None = None):
    """One entry point for the server. loss_fn_inputs holds the wire names: `weights`
    (cross_entropy) or `logprobs` + `advantages` (RL losses), each shaped like target_logprobs.
    Returns (loss_sum scalar, elementwise_loss) — `loss:sum` is the first."""
    config = resolve_loss_fn_config(loss_fn, loss_fn_config)
    needed = ["weights"] if loss_fn == "cross_entropy" else ["logprobs", "advantages"]
    missing = [k for k in needed if k not in loss_fn_inputs]
    if missing:
        raise ValueError(f"loss_fn {loss_fn!r} needs loss_fn_inputs {needed}; missing {missing}")
    target_logprobs = target_logprobs.astype(jnp.float32)
    if loss_fn == "cross_entropy":
        elementwise = cross_entropy(target_logprobs, jnp.asarray(loss_fn_inputs["weights"],
                                                                 jnp.float32), valid_mask)
    else:
        elementwise = TINKER_LOSSES.get(loss_fn)(
            target_logprobs, jnp.asarray(loss_fn_inputs["logprobs"], jnp.float32),
            jnp.asarray(loss_fn_inputs["advantages"], jnp.float32), valid_mask, **config)
    return jnp.sum(elementwise), elementwise
