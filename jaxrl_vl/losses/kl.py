"""Per-token KL(pi || pi_ref) estimators from sampled tokens (Schulman, "Approximating KL").

With log-ratio d = logprobs - ref_logprobs on tokens sampled from pi:
  k1 = d                      unbiased, high variance, can be negative
  k2 = d^2 / 2                biased, low variance, its gradient is the true KL gradient on-policy
  k3 = exp(-d) - 1 + d        unbiased, low variance, always >= 0 (GRPO's choice)
All take arrays of any matching shape (typically [B, L]) and return the same shape, fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_vl.losses.registry import KL_ESTIMATORS

# exp(-d) overflows for very negative d (a token the reference finds far likelier than the
# policy); clamping the log-ratio keeps k3 finite. 20 nats is far outside any healthy run.
K3_LOG_RATIO_CLAMP = 20.0


def _log_ratio(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    return logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    return _log_ratio(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    return 0.5 * jnp.square(_log_ratio(logprobs, ref_logprobs))


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    d = jnp.clip(_log_ratio(logprobs, ref_logprobs), -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return jnp.exp(-d) - 1.0 + d


def kl_penalized_rewards(rewards: jax.Array, kl_per_token: jax.Array, loss_mask: jax.Array,
                         kl_coef: float) -> jax.Array:
    """KL as a reward penalty (instead of a loss term): r_i - kl_coef * sum_t KL_t over the
    sampled tokens of sequence i. rewards [B]; kl_per_token, loss_mask [B, L] -> [B]."""
    kl_sum = jnp.sum(jnp.where(loss_mask != 0, kl_per_token * loss_mask, 0.0), axis=-1)
    return rewards - kl_coef * jax.lax.stop_gradient(kl_sum)
