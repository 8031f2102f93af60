"""Outcome-reward advantage estimators over groups of samples of the same prompt.

rewards: [G, n] float — G groups (prompts/seeds), n samples each. Every estimator returns
advantages [G, n] (one per sample; broadcast over its tokens with `token_advantages`).
  grpo                  (r - mean_group) / (std_group + eps)       DeepSeekMath GRPO
  grpo_no_std, dr_grpo  r - mean_group                              Dr.GRPO (no std bias)
  rloo                  r - mean of the OTHER n-1 samples           leave-one-out baseline
  reinforce_plus_plus   (r - mean_batch) / (std_batch + eps)        REINFORCE++ (global whitening)
  reinforce_plus_plus_baseline  r - mean_group, then global whitening  REINFORCE++-baseline
Standard deviations use n-1 in the denominator (torch.std's default, as verl and TRL do).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vl.losses.registry import ADVANTAGES

EPS = 1e-6


def _check_rewards(rewards, min_group_size: int = 1):
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {rewards.shape}")
    if rewards.shape[1] < min_group_size:
        raise ValueError(f"this estimator needs group_size >= {min_group_size}, "
                         f"got rewards shape {rewards.shape}")
    return jnp.asarray(rewards, jnp.float32)


def _std(x, axis=None, keepdims=False):
    count = x.size if axis is None else x.shape[axis]
    return jnp.std(x, axis=axis, keepdims=keepdims, ddof=1 if count > 1 else 0)


@ADVANTAGES.register("grpo")
def grpo(rewards: jax.Array, eps: float = EPS) -> jax.Array:
    r = _check_rewards(rewards)
    centered = r - jnp.mean(r, axis=1, keepdims=True)
    return centered / (_std(r, axis=1, keepdims=True) + eps)


@ADVANTAGES.register("grpo_no_std")
@ADVANTAGES.register("dr_grpo")
def grpo_no_std(rewards: jax.Array, eps: float = EPS) -> jax.Array:
    r = _check_rewards(rewards)
    return r - jnp.mean(r, axis=1, keepdims=True)


@ADVANTAGES.register("rloo")
def rloo(rewards: jax.Array, eps: float = EPS) -> jax.Array:
    r = _check_rewards(rewards, min_group_size=2)
    n = r.shape[1]
    leave_one_out_mean = (jnp.sum(r, axis=1, keepdims=True) - r) / (n - 1)
    return r - leave_one_out_mean


@ADVANTAGES.register("reinforce_plus_plus")
def reinforce_plus_plus(rewards: jax.Array, eps: float = EPS) -> jax.Array:
    r = _check_rewards(rewards)
    return (r - jnp.mean(r)) / (_std(r) + eps)


@ADVANTAGES.register("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(rewards: jax.Array, eps: float = EPS) -> jax.Array:
    r = _check_rewards(rewards)
    centered = r - jnp.mean(r, axis=1, keepdims=True)
    return (centered - jnp.mean(centered)) / (_std(centered) + eps)


def zero_variance_groups(rewards, atol: float = 0.0) -> np.ndarray:
    """DAPO dynamic sampling: bool [G], True where every sample of the group got the same reward
    (within atol), so its group-relative advantage is 0 and the group teaches nothing."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {r.shape}")
    return (r.max(axis=1) - r.min(axis=1)) <= atol


def filter_zero_variance_groups(rewards, *group_arrays, atol: float = 0.0):
    """Drop zero-variance groups (host side). rewards [G, n]; each extra array has leading dim G.
    Returns (kept rewards [G', n], *kept arrays, kept_group_indices [G'])."""
    keep = ~zero_variance_groups(rewards, atol)
    kept = np.nonzero(keep)[0]
    out = [np.asarray(rewards)[kept]]
    for array in group_arrays:
        if len(array) != len(keep):
            raise ValueError(f"array with leading dim {len(array)} does not match "
                             f"{len(keep)} reward groups")
        out.append(np.asarray(array)[kept] if not isinstance(array, list)
                   else [array[i] for i in kept])
    return (*out, kept)


def weight_negative(advantages, weight: float):
    """Scales the negative advantages by `weight` (per episode: a float or an array of per-turn values).
    1 = unchanged; 0 = learn from the better-than-average samples only; in between, W-REINFORCE (Zhu et
    al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", lambda = 0.1):
    pushing probability down on failures spreads it over every other token, which on a small policy
    with few steps can unlearn good moves faster than the positives teach them."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"rl.negative_advantage_weight must be in [0, 1], got {weight}")
    if weight == 1.0:
        return advantages

    def scaled(a):  # per-turn arrays stay arrays, per-episode floats stay floats
        if np.ndim(a):
            return np.where(np.asarray(a) < 0, weight * np.asarray(a), a)
        return weight * a if a < 0 else a

    return [[scaled(a) for a in row] for row in advantages]


def token_advantages(sequence_advantages: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Broadcast one advantage per sequence [B] over its tokens: -> [B, L] (0 off the mask)."""
    return jnp.where(loss_mask != 0, sequence_advantages[:, None], 0.0).astype(jnp.float32)


def compute_advantages(name: str, rewards, **kwargs) -> jax.Array:
    """rewards [G, n] -> advantages [G, n] by registered estimator name."""
    return ADVANTAGES.get(name)(rewards, **kwargs)
