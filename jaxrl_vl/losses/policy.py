"""Policy-gradient losses for RL (GRPO family), as pure per-token functions plus one driver.

Inputs shared by all losses (all [B, L], fp32, aligned so position t scores token t):
  logprobs          trainer log pi_theta(token) (carries the gradient)
  old_logprobs      log pi_old(token) of the policy the ratio is taken against (the rollout
                    policy, or the trainer's recomputation of it for off-policy correction)
  advantages        per-token advantages (a sequence's advantage broadcast over its tokens)
  loss_mask         1 on sampled tokens that are trained, 0 elsewhere
Each registered loss returns (per_token_loss [B, L], indicators: dict name -> [B, L] in {0, 1})
whose masked means become metrics (e.g. clip_fraction). `compute_policy_loss` weights the
per-token loss by the rollout correction's importance weights (given, see
losses/rollout_correction.py), adds the optional KL term and the aggregation mode, and returns
(scalar loss, metrics).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl_vl.losses import aggregate as agg
from jaxrl_vl.losses.registry import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES

# exp() of a log-ratio above ~88 overflows fp32; ratios this far out are clipped anyway.
LOG_RATIO_CLAMP = 20.0


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of `compute_policy_loss`. Frozen and hashable, so it can be a jit static arg."""
    name: str = "ppo"                    # a registered policy loss, see registry POLICY_LOSSES
    aggregation: str = "token-mean"      # see losses/aggregate.py
    clip_eps_low: float = 0.2            # ratio lower bound 1 - eps_low
    clip_eps_high: float = 0.2           # ratio upper bound 1 + eps_high (DAPO clip-higher: 0.28)
    dual_clip_c: float | None = None     # dual-clip: cap -A*c on negative-advantage tokens (e.g. 3)
    # = rollout_correction rollout_is="token", rollout_is_threshold=tis_cap, computed inside the loss
    # from (old, rollout) until the RL loop passes rollout_is_weights (then this field goes)
    tis_cap: float | None = None
    kl_coef: float = 0.0                 # > 0 adds kl_coef * KL(pi || pi_ref) per token
    kl_estimator: str = "k3"             # k1 / k2 / k3
    token_sum_divisor: float = 1.0       # for sequence-mean-token-sum (Dr.GRPO: max new tokens)
    max_segments_per_row: int = 1        # packed sequences per row (segment ids 1..this)

    def __post_init__(self):
        POLICY_LOSSES.get(self.name)
        AGGREGATIONS.get(self.aggregation)
        KL_ESTIMATORS.get(self.kl_estimator)
        if self.clip_eps_low < 0 or self.clip_eps_high < 0:
            raise ValueError(f"clip_eps_low/clip_eps_high must be >= 0, got "
                             f"{self.clip_eps_low}/{self.clip_eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (typically 3), got {self.dual_clip_c}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 (typically 2), got {self.tis_cap}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.token_sum_divisor <= 0:
            raise ValueError(f"token_sum_divisor must be > 0, got {self.token_sum_divisor}")
        if self.max_segments_per_row < 1:
            raise ValueError(f"max_segments_per_row must be >= 1, got {self.max_segments_per_row}")


def log_ratio(logprobs: jax.Array, old_logprobs: jax.Array) -> jax.Array:
    return jnp.clip(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _clipped_surrogate(ratio, advantages, cfg: PolicyLossConfig):
    """PPO's pessimistic surrogate with asymmetric bounds and optional dual clip -> (loss, ind)."""
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss = jnp.maximum(unclipped, clipped)
    indicators = {"clip_fraction": (clipped > unclipped).astype(jnp.float32)}
    if cfg.dual_clip_c is not None:
        # Dual clip (Ye et al. 2020): for A < 0 a huge ratio makes -A*r unbounded; cap it at -A*c.
        capped = jnp.minimum(loss, -advantages * cfg.dual_clip_c)
        dual_active = (advantages < 0) & (loss > -advantages * cfg.dual_clip_c)
        loss = jnp.where(advantages < 0, capped, loss)
        indicators["dual_clip_fraction"] = dual_active.astype(jnp.float32)
    return loss, indicators


@POLICY_LOSSES.register("ppo")
def ppo_clip_loss(logprobs, old_logprobs, advantages, loss_mask, cfg, segment_ids=None):
    """PPO-clip, token-level ratio; clip-higher via clip_eps_high; dual clip via dual_clip_c."""
    ratio = jnp.exp(log_ratio(logprobs, old_logprobs))
    return _clipped_surrogate(ratio, advantages, cfg)


@POLICY_LOSSES.register("gspo")
def gspo_loss(logprobs, old_logprobs, advantages, loss_mask, cfg, segment_ids=None):
    """GSPO (Zheng et al. 2025), token form: the ratio's value is the sequence's geometric-mean
    ratio s = exp(mean_t log r_t), its gradient that of s * log pi(y_t). Use small eps (3e-4 /
    4e-4) and aggregation="sequence-mean" to get the paper's objective."""
    per_token_log_ratio = agg.masked(log_ratio(logprobs, old_logprobs), loss_mask)
    sums = agg.sequence_sums(per_token_log_ratio, segment_ids, cfg.max_segments_per_row)
    counts = agg.sequence_sums((loss_mask != 0).astype(jnp.float32), segment_ids,
                               cfg.max_segments_per_row)
    sequence_log_ratio = sums / jnp.maximum(counts, 1.0)
    token_sequence_log_ratio = agg.broadcast_to_tokens(
        sequence_log_ratio, segment_ids, logprobs.shape[-1])
    ratio = jnp.exp(jax.lax.stop_gradient(token_sequence_log_ratio)
                    + logprobs - jax.lax.stop_gradient(logprobs))
    return _clipped_surrogate(ratio, advantages, cfg)


@POLICY_LOSSES.register("cispo")
def cispo_loss(logprobs, old_logprobs, advantages, loss_mask, cfg, segment_ids=None):
    """CISPO (MiniMax-M1): -sg(clip(r, 1-eps_low, 1+eps_high)) * A * log pi. The paper clips only
    the top (set clip_eps_low >= 1 to disable the lower bound)."""
    ratio = jnp.exp(log_ratio(logprobs, old_logprobs))
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss = -jax.lax.stop_gradient(clipped) * advantages * logprobs
    return loss, {"clip_fraction": (clipped != ratio).astype(jnp.float32)}


@POLICY_LOSSES.register("importance_sampling")
def importance_sampling_loss(logprobs, old_logprobs, advantages, loss_mask, cfg,
                             segment_ids=None):
    """Plain (unclipped) importance-sampled policy gradient: -r * A."""
    ratio = jnp.exp(log_ratio(logprobs, old_logprobs))
    return -ratio * advantages, {}


def compute_policy_loss(config: PolicyLossConfig, logprobs: jax.Array, old_logprobs: jax.Array,
                        advantages: jax.Array, loss_mask: jax.Array, *,
                        rollout_is_weights: jax.Array | None = None,
                        rollout_logprobs: jax.Array | None = None,
                        ref_logprobs: jax.Array | None = None,
                        segment_ids: jax.Array | None = None):
    """All arrays [B, L]. Returns (loss scalar, metrics: dict of scalars).

    rollout_is_weights: the rollout correction's weights w (rollout_correction.compute_rollout_correction):
      each token's loss becomes sg(w) * loss; its rejection is already in loss_mask.
    rollout_logprobs: only for `config.tis_cap` (the same weights with rollout_is="token",
      computed here from old_logprobs, which must then be the trainer's).
    ref_logprobs: frozen reference policy; needed when `config.kl_coef > 0`.
    segment_ids: int [B, L] for packed rows (sequence aggregation and GSPO), else None.
    """
    if config.tis_cap is not None and rollout_logprobs is None:
        raise ValueError("PolicyLossConfig.tis_cap is set but rollout_logprobs was not passed; "
                         "pass the inference engine's logprobs or set tis_cap=None")
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("PolicyLossConfig.kl_coef > 0 needs ref_logprobs (reference policy "
                         "logprobs); pass them or set kl_coef=0")
    if segment_ids is not None:
        agg.check_segment_ids(segment_ids, config.max_segments_per_row)
    logprobs = logprobs.astype(jnp.float32)
    old_logprobs = old_logprobs.astype(jnp.float32)
    advantages = advantages.astype(jnp.float32)
    loss_mask = loss_mask.astype(jnp.float32)

    loss_fn = POLICY_LOSSES.get(config.name)
    per_token, indicators = loss_fn(logprobs, old_logprobs, advantages, loss_mask, config,
                                    segment_ids)
    metrics = {name: agg.masked_mean(v, loss_mask) for name, v in indicators.items()}

    if config.tis_cap is not None:
        if rollout_is_weights is not None:
            raise ValueError("PolicyLossConfig.tis_cap and rollout_is_weights both weight the loss; pass one")
        from jaxrl_vl.losses import rollout_correction  # imports this module: import here, not at the top

        rollout_log_ratio = log_ratio(old_logprobs, rollout_logprobs.astype(jnp.float32))
        rollout_is_weights = rollout_correction.importance_weights(
            rollout_log_ratio, loss_mask, "token", config.tis_cap,
            segment_ids=segment_ids, max_segments_per_row=config.max_segments_per_row)
        metrics["tis_truncated_fraction"] = agg.masked_mean(
            (rollout_log_ratio > jnp.log(config.tis_cap)).astype(jnp.float32), loss_mask)
    if rollout_is_weights is not None:
        per_token = per_token * jax.lax.stop_gradient(rollout_is_weights.astype(jnp.float32))
        metrics["rollout_is_weight_mean"] = agg.masked_mean(rollout_is_weights, loss_mask)

    agg_kwargs = dict(segment_ids=segment_ids, max_segments_per_row=config.max_segments_per_row,
                      token_sum_divisor=config.token_sum_divisor)
    policy_loss = agg.aggregate(config.aggregation, per_token, loss_mask, **agg_kwargs)
    loss = policy_loss
    if ref_logprobs is not None:
        kl = KL_ESTIMATORS.get(config.kl_estimator)(logprobs, ref_logprobs)
        metrics["kl_to_ref"] = agg.masked_mean(kl, loss_mask)
        if config.kl_coef > 0:
            loss = loss + config.kl_coef * agg.aggregate(config.aggregation, kl, loss_mask,
                                                         **agg_kwargs)

    ratio = jnp.exp(log_ratio(logprobs, old_logprobs))
    present = loss_mask != 0
    ratio_min, ratio_max = agg.masked_min_max(ratio, loss_mask)  # 0 for an empty (filtered) micro-batch
    metrics.update(
        policy_loss=policy_loss,
        ratio_mean=agg.masked_mean(ratio, loss_mask),
        ratio_min=ratio_min,
        ratio_max=ratio_max,
        approx_kl_to_old=agg.masked_mean(
            KL_ESTIMATORS.get("k3")(logprobs, old_logprobs), loss_mask),
        num_loss_tokens=jnp.sum(present).astype(jnp.float32),
    )
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
