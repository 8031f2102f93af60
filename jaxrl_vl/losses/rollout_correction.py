"""Rollout correction: importance weights and rejection masks between the policy vLLM sampled with
and the trainer's old policy, and the drift metrics that show their mismatch. Pure JAX functions.

Three policies, as in verl's rollout correction (decoupled PPO, Hilton et al. 2021):
  pi_rollout  what vLLM sampled from: `rollout_logprobs` (vLLM's sampled-token logprobs; at a
              temperature != 1 the server must return processed logprobs, see rollout/server.py)
  pi_old      the PPO trust-region anchor: the trainer's logprobs computed ONCE per RL step, at that
              step's params before its first update (`loss.old_logprobs="trainer"`, one extra forward);
              or pi_rollout itself (`loss.old_logprobs="rollout"`: verl's bypass_mode, no forward)
  pi_theta    the params being updated (carries the gradient)
All three are scored at the sampling temperature (losses/sft.py `temperature`).

Per sampled token t (all arrays token-aligned [..., L], index t = token t):
  ratio_t  = pi_theta(t) / pi_old(t)         the PPO/GRPO ratio, clipped as the policy loss says
  rho_t    = pi_old(t) / pi_rollout(t)       the rollout ratio: fixed within an RL step
  w_t      = min(rho, C)                     `rollout_is` (C = rollout_is_threshold), rho taken at
             "token":     rho_t
             "sequence":  prod_{s in seq} rho_s = exp(sum_s log rho_s)   (one weight per sequence)
             "geometric": exp(mean_s log rho_s)                          (one weight per sequence)
  keep_t   in {0, 1}                          `rollout_rs`: 0 where the token's rho ("token"), or its
             sequence's product ("sequence") or geometric mean ("geometric"), leaves
             [rollout_rs_threshold_lower, rollout_rs_threshold] (lower defaults to 1 / upper)
  loss     = aggregate(sg(w_t) * loss_t(ratio_t), mask = loss_mask_t * keep_t)
The weight multiplies the per-token loss (`compute_policy_loss(..., rollout_is_weights=w)`); the
rejection zeroes the token and takes it out of the aggregation's denominator (the loop multiplies
the batch's loss_mask by keep, as verl modifies response_mask). A "sequence" is a row, or a packed
segment with `segment_ids`. w and keep depend on pi_old and pi_rollout only, so
`compute_rollout_correction` runs once per RL step on the whole batch (exact percentiles) and they
stay fixed over all `rl.updates_per_step` updates.

With `loss.old_logprobs="rollout"` rho = 1 identically: `check_config` rejects rollout_is / rollout_rs
then (the PPO ratio against pi_rollout is the correction). `loss.tis_cap=C` (policy.py) is exactly
rollout_is="token", rollout_is_threshold=C; it stays only until the loop passes these weights.

verl names: rollout_is, rollout_is_threshold, rollout_rs, rollout_rs_threshold, rollout_rs_threshold_lower
as in verl's `algorithm.rollout_correction` (its older API: rollout_rs = token | sequence | geometric;
the newer token_k1 / seq_sum_k1 / seq_mean_k1 with "lower_upper" thresholds are the same three masks).
Not here: verl's rollout_is_batch_normalize and token veto. Metrics keep verl's names (kl, k3_kl,
rollout_is_*, rollout_rs_*); the loop logs them under "rollout_corr/".
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl_vl.losses import aggregate as agg
from jaxrl_vl.losses.policy import LOG_RATIO_CLAMP, log_ratio
from jaxrl_vl.losses.registry import KL_ESTIMATORS

LEVELS = ("token", "sequence", "geometric")
OLD_LOGPROBS_SOURCES = ("rollout", "trainer")
RATIO_PERCENTILES = (1, 5, 50, 95, 99)
SCORED_LOGPROBS_MODE = "processed_logprobs"  # vLLM --logprobs-mode that applies the temperature


@dataclasses.dataclass(frozen=True)
class RolloutCorrectionConfig:
    """See the module docstring. None disables a part; metrics are computed either way."""
    rollout_is: str | None = None                    # None | token | sequence | geometric
    rollout_is_threshold: float = 2.0                # cap C of the importance weight
    rollout_rs: str | None = None                    # None | token | sequence | geometric
    rollout_rs_threshold: float | None = None        # upper bound of the kept ratio
    rollout_rs_threshold_lower: float | None = None  # lower bound (None: 1 / upper)

    def __post_init__(self):
        for key in ("rollout_is", "rollout_rs"):
            value = getattr(self, key)
            if value is not None and value not in LEVELS:
                raise ValueError(f"rollout_correction.{key}={value!r}: choose None or one of {LEVELS}")
        if self.rollout_is_threshold < 1.0:
            raise ValueError(f"rollout_correction.rollout_is_threshold={self.rollout_is_threshold} < 1 would cap "
                             "on-policy tokens (rho = 1) too; typical values are 2 (token) to 10 (sequence)")
        if self.rollout_rs is not None and self.rollout_rs_threshold is None:
            raise ValueError(f"rollout_correction.rollout_rs={self.rollout_rs!r} needs rollout_rs_threshold "
                             "(the largest kept ratio, e.g. 2.0; geometric: e.g. 1.001)")
        upper, lower = self.rollout_rs_threshold, self.rs_lower
        if upper is not None and not (0.0 < lower <= 1.0 <= upper):
            raise ValueError(f"rollout_correction.rollout_rs_threshold_lower={lower} and rollout_rs_threshold="
                             f"{upper} must satisfy 0 < lower <= 1 <= upper (else on-policy tokens are rejected)")

    @property
    def rs_lower(self) -> float:
        if self.rollout_rs_threshold_lower is not None:
            return self.rollout_rs_threshold_lower
        return 1.0 / self.rollout_rs_threshold if self.rollout_rs_threshold else 0.0


def check_config(correction: RolloutCorrectionConfig, *, old_logprobs: str, tis_cap: float | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                 logprobs_mode: str = "raw_logprobs") -> None:
    """Config-time check of how rollouts are scored and corrected; raises ValueError naming the keys.

    old_logprobs: loss.old_logprobs; tis_cap: loss.tis_cap (None or 0 = off); temperature, top_p,
    top_k: rl.* sampling of training rollouts; logprobs_mode: the servers' vllm.logprobs_mode.
    top_p < 1 / top_k > 0 are rejected rather than scored: the trainer would have to rebuild vLLM's
    truncated support per position (a sort over the vocabulary per token, and ties decided as vLLM
    decides them); we score the full tempered softmax, which is exact only without truncation."""
    if old_logprobs not in OLD_LOGPROBS_SOURCES:
        raise ValueError(f"loss.old_logprobs={old_logprobs!r}: choose one of {OLD_LOGPROBS_SOURCES}")
    if old_logprobs == "rollout":
        for key, value in (("rollout_correction.rollout_is", correction.rollout_is),
                           ("rollout_correction.rollout_rs", correction.rollout_rs), ("loss.tis_cap", tis_cap)):
            if value:
                raise ValueError(f"{key}={value!r} with loss.old_logprobs='rollout': the old policy IS the rollout "
                                 "policy, so pi_old / pi_rollout = 1 and the correction does nothing; set "
                                 "loss.old_logprobs='trainer' (one extra forward per RL step) or turn it off")
    if tis_cap and correction.rollout_is:
        raise ValueError(f"loss.tis_cap={tis_cap} and rollout_correction.rollout_is={correction.rollout_is!r} both "
                         "weight the loss; tis_cap=C is rollout_is='token', rollout_is_threshold=C: keep one")
    if temperature <= 0:
        raise ValueError(f"rl.temperature={temperature}: RL needs sampling (> 0); greedy rollouts give every "
                         "episode of a group the same tokens and have no logprobs to correct with")
    if top_p < 1.0 or (top_k is not None and top_k > 0):
        raise ValueError(f"rl.top_p={top_p}, rl.top_k={top_k}: the trainer scores the full softmax, not vLLM's "
                         "truncated one, so every ratio would be biased; use rl.top_p=1.0 and rl.top_k=-1")
    if temperature != 1.0 and logprobs_mode != SCORED_LOGPROBS_MODE:
        raise ValueError(f"rl.temperature={temperature} with vllm.logprobs_mode={logprobs_mode!r}: vLLM then "
                         "reports logprobs of the temperature-1 distribution; set vllm.logprobs_mode="
                         f"{SCORED_LOGPROBS_MODE!r} (servers attached by URL: start them with --logprobs-mode "
                         f"{SCORED_LOGPROBS_MODE})")


def per_sequence_log_ratio(log_rho: jax.Array, loss_mask: jax.Array, level: str, *,
                           segment_ids: jax.Array | None = None, max_segments_per_row: int = 1) -> jax.Array:
    """log rho at `level`, per token [B, L]: the token's own ("token"), or its sequence's sum
    ("sequence") or mean ("geometric") over its loss tokens."""
    if level == "token":
        return log_rho
    present = (loss_mask != 0).astype(jnp.float32)
    sums = agg.sequence_sums(agg.masked(log_rho, loss_mask), segment_ids, max_segments_per_row)
    if level == "geometric":
        sums = sums / jnp.maximum(agg.sequence_sums(present, segment_ids, max_segments_per_row), 1.0)
    return agg.broadcast_to_tokens(sums, segment_ids, log_rho.shape[-1])


def importance_weights(log_rho, loss_mask, level: str, threshold: float, *, segment_ids=None,
                       max_segments_per_row: int = 1) -> jax.Array:
    """Truncated importance weights min(rho_level, threshold), 0 off the loss mask. [B, L]."""
    level_log_rho = per_sequence_log_ratio(log_rho, loss_mask, level, segment_ids=segment_ids,
                                           max_segments_per_row=max_segments_per_row)
    level_log_rho = jnp.clip(level_log_rho, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return agg.masked(jnp.minimum(jnp.exp(level_log_rho), threshold), loss_mask)


def rejection_mask(log_rho, loss_mask, level: str, lower: float, upper: float, *, segment_ids=None,
                   max_segments_per_row: int = 1) -> jax.Array:
    """loss_mask with the tokens whose rho_level leaves [lower, upper] set to 0. [B, L]."""
    level_log_rho = per_sequence_log_ratio(log_rho, loss_mask, level, segment_ids=segment_ids,
                                           max_segments_per_row=max_segments_per_row)
    inside = (level_log_rho >= jnp.log(lower)) & (level_log_rho <= jnp.log(upper))
    return jnp.where(inside, loss_mask, 0.0).astype(loss_mask.dtype)


def compute_rollout_correction(config: RolloutCorrectionConfig, old_logprobs: jax.Array,
                               rollout_logprobs: jax.Array, loss_mask: jax.Array, *,
                               segment_ids: jax.Array | None = None, max_segments_per_row: int = 1,
                               turn_ids: jax.Array | None = None, max_turns_logged: int = 8):
    """-> (rollout_is_weights, corrected loss_mask, metrics dict of fp32 scalars).

    All arrays token-aligned, [..., L] with any leading dims (e.g. the loop's [A, B, L] micro-batches).
    rollout_is_weights is 1 on loss tokens (0 elsewhere) when config.rollout_is is None; the mask is
    loss_mask when config.rollout_rs is None. Metrics: see `drift_metrics`, plus rollout_is_* with IS.
    """
    shape = loss_mask.shape
    flat = lambda x: None if x is None else jnp.reshape(x, (-1, shape[-1]))  # noqa: E731
    old, rollout, mask = (flat(x).astype(jnp.float32) for x in (old_logprobs, rollout_logprobs, loss_mask))
    segments = dict(segment_ids=flat(segment_ids), max_segments_per_row=max_segments_per_row)
    log_rho = log_ratio(old, rollout)
    weights = mask
    if config.rollout_is is not None:
        weights = importance_weights(log_rho, mask, config.rollout_is, config.rollout_is_threshold, **segments)
    kept = mask
    if config.rollout_rs is not None:
        kept = rejection_mask(log_rho, mask, config.rollout_rs, config.rs_lower, config.rollout_rs_threshold,
                              **segments)
    metrics = drift_metrics(old, rollout, mask, kept, turn_ids=flat(turn_ids), max_turns_logged=max_turns_logged,
                            **segments)
    if config.rollout_is is not None:
        metrics.update(importance_weight_metrics(weights, log_rho, mask, config, **segments))
    return weights.reshape(shape), kept.reshape(shape).astype(loss_mask.dtype), metrics


def _sequence_fraction(flag, mask, segment_ids, max_segments_per_row):
    """Fraction of sequences (with loss tokens) holding at least one token where flag != 0."""
    present = (mask != 0).astype(jnp.float32)
    counts = agg.sequence_sums(present, segment_ids, max_segments_per_row)
    flagged = agg.sequence_sums(present * flag, segment_ids, max_segments_per_row)
    return jnp.sum((flagged > 0) & (counts > 0)) / jnp.maximum(jnp.sum(counts > 0), 1)


def drift_metrics(old_logprobs, rollout_logprobs, loss_mask, kept_mask=None, *, segment_ids=None,
                  max_segments_per_row: int = 1, turn_ids=None, max_turns_logged: int = 8) -> dict:
    """How far pi_rollout is from pi_old on the sampled tokens ([B, L] inputs, fp32 scalars out).

    kl / k3_kl: KL(rollout || old) estimated from rollout samples, k1 = log(pi_rollout / pi_old) and
    k3 = rho - 1 - log rho; ratio_mean/min/max and ratio_p<q> (percentiles) of rho; abs_log_ratio_mean /
    _max (the same as rl_step's drift_mean / drift_max); rollout_rs_masked_fraction (loss tokens
    rejected) and rollout_rs_seq_masked_fraction (sequences with a rejected token); per turn k <
    max_turns_logged (with turn_ids): kl_turn_k, k3_kl_turn_k, ratio_mean_turn_k,
    rollout_rs_masked_fraction_turn_k, tokens_turn_k."""
    mask = loss_mask
    kept = mask if kept_mask is None else kept_mask
    log_rho = log_ratio(old_logprobs, rollout_logprobs)
    rho = jnp.exp(log_rho)
    k1 = KL_ESTIMATORS.get("k1")(rollout_logprobs, old_logprobs)
    k3 = KL_ESTIMATORS.get("k3")(rollout_logprobs, old_logprobs)
    rejected = ((mask != 0) & (kept == 0)).astype(jnp.float32)
    ratio_min, ratio_max = agg.masked_min_max(rho, mask)
    metrics = {
        "kl": agg.masked_mean(k1, mask), "k3_kl": agg.masked_mean(k3, mask),
        "ratio_mean": agg.masked_mean(rho, mask), "ratio_min": ratio_min, "ratio_max": ratio_max,
        "abs_log_ratio_mean": agg.masked_mean(jnp.abs(log_rho), mask),
        "abs_log_ratio_max": jnp.max(agg.masked(jnp.abs(log_rho), mask)),
        "rollout_rs_masked_fraction": agg.masked_mean(rejected, mask),
        "rollout_rs_seq_masked_fraction": _sequence_fraction(rejected, mask, segment_ids, max_segments_per_row),
        "tokens": jnp.sum(mask != 0).astype(jnp.float32),
    }
    quantiles = jnp.nanpercentile(jnp.where(mask != 0, rho, jnp.nan), jnp.asarray(RATIO_PERCENTILES, jnp.float32))
    for q, value in zip(RATIO_PERCENTILES, jnp.nan_to_num(quantiles)):
        metrics[f"ratio_p{q}"] = value
    if turn_ids is not None:
        metrics.update(_per_turn(turn_ids, mask, max_turns_logged, kl=k1, k3_kl=k3, ratio_mean=rho,
                                 rollout_rs_masked_fraction=rejected))
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def _per_turn(turn_ids, mask, max_turns_logged: int, **per_token) -> dict:
    one_hot = ((turn_ids[..., None] == jnp.arange(max_turns_logged)) & (mask[..., None] != 0)).astype(jnp.float32)
    tokens = jnp.sum(one_hot, axis=tuple(range(one_hot.ndim - 1)))  # [K]
    out = {f"tokens_turn_{k}": tokens[k] for k in range(max_turns_logged)}
    for name, values in per_token.items():
        means = jnp.einsum("bl,blk->k", agg.masked(values, mask), one_hot) / jnp.maximum(tokens, 1.0)
        out.update({f"{name}_turn_{k}": means[k] for k in range(max_turns_logged)})
    return out


def importance_weight_metrics(weights, log_rho, mask, config: RolloutCorrectionConfig, *, segment_ids=None,
                              max_segments_per_row: int = 1) -> dict:
    """rollout_is_mean/min/max of the applied weights, rollout_is_ratio_fraction_high (loss tokens whose
    rho at the IS level exceeded the cap), rollout_is_eff_sample_size (1 / mean of (w / mean w)^2)."""
    level_log_rho = per_sequence_log_ratio(log_rho, mask, config.rollout_is, segment_ids=segment_ids,
                                           max_segments_per_row=max_segments_per_row)
    low, high = agg.masked_min_max(weights, mask)
    mean = agg.masked_mean(weights, mask)
    return {
        "rollout_is_mean": mean, "rollout_is_min": low, "rollout_is_max": high,
        "rollout_is_ratio_fraction_high": agg.masked_mean(
            (level_log_rho > jnp.log(config.rollout_is_threshold)).astype(jnp.float32), mask),
        "rollout_is_eff_sample_size": 1.0 / jnp.maximum(agg.masked_mean(jnp.square(weights / jnp.maximum(mean, 1e-8)),
                                                                        mask), 1e-8),
    }
