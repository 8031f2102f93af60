"""The RL loss for the shared step (train/step.py): policy losses on sampled tokens, drift metrics.

Batch (data/collate.rl_micro_batches from trajectory.training_rows, stacked on a leading micro-batch axis A):
input_ids, segment_ids [A, B, L], position_ids [A, 3, B, L], vision arrays, and per-token arrays aligned with
the tokens (index t describes token t):
  loss_mask        float32 [A, B, L]  1 on tokens vLLM sampled
  rollout_logprobs float32 [A, B, L]  vLLM's logprobs of those tokens (at the sampling temperature)
  advantages       float32 [A, B, L]  the trajectory's (or turn's) advantage on its sampled tokens
  turn_ids         int32   [A, B, L]  episode turn of each sampled token (-1 elsewhere)
  old_logprobs     float32 [A, B, L]  optional: the trainer's logprobs at the weights the RL step started from
                                      (computed once per RL step, before the first update; `score_batches`)
  ref_logprobs     float32 [A, B, L]  optional: frozen reference policy (KL)
  target_positions int32   [A, B, T]  optional: where the chunked loss computes logits
Position t of the model predicts token t+1, so every per-token array is shifted left by one before the loss.

The PPO ratio is pi_theta / pi_old with pi_old = `old_logprobs` when the batch has them, else the rollout
logprobs (the rollout policy IS the old policy: one update per RL step, synchronous). Drift metrics compare
the trainer's logprobs with vLLM's on the first micro-batches of an RL step (the loop reports those of the
first update): with the exact rendered inputs and pushed weights, their mean stays ~1e-6 in fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_vl.activation_sharding import traced_under_mesh
from jaxrl_vl.losses.aggregate import masked
from jaxrl_vl.losses.policy import PolicyLossConfig, compute_policy_loss
from jaxrl_vl.losses.sft import chunked_token_logprobs, token_logprobs
from jaxrl_vl.losses.target_positions import at_target_positions, from_target_positions
from jaxrl_vl.train.step import Forward, ParamsView, StepLoss, device_keys, make_update_step

SHIFTED_KEYS = ("loss_mask", "rollout_logprobs", "advantages", "turn_ids", "ref_logprobs", "old_logprobs")
_PER_MICRO_EXTREMES = ("ratio_min", "ratio_max", "num_loss_tokens")


def shift_left(x: jax.Array, fill=0) -> jax.Array:
    """[B, L] -> [B, L]: x[:, t+1] at t, `fill` at the last position."""
    return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def shifted_rl_inputs(batch: dict) -> dict:
    """The next-token view of a (micro-)batch: targets and per-token arrays at the position that
    predicts them; loss_mask is 0 where t and t+1 belong to different packed segments."""
    same_segment = shift_left(batch["segment_ids"]) == batch["segment_ids"]
    out = {"targets": shift_left(batch["input_ids"])}
    for key in SHIFTED_KEYS:
        if key in batch:
            out[key] = shift_left(batch[key], -1 if key == "turn_ids" else 0)
    out["loss_mask"] = jnp.where(same_segment, out["loss_mask"], 0.0).astype(jnp.float32)
    return out


def trainer_logprobs(params: dict, batch: dict, targets: jax.Array, forward: Forward, *,
                     temperature: float = 1.0, logit_bias: tuple = ()):
    """-> (logprobs fp32 [B, L], entropy fp32 [B, L]) of `targets` under softmax((logits + logit_bias) /
    temperature): the distribution vLLM sampled from, as its processed logprobs report (its raw ones are
    temperature 1 without bias). Chunked with batch["target_positions"]: logits at those positions only, 0
    elsewhere."""
    if forward.loss_chunk_size > 0:
        length = targets.shape[1]
        hidden, targets = at_target_positions(batch, forward.hidden(params, batch), targets)
        out = chunked_token_logprobs(hidden, forward.unembedding(params), targets, chunk_size=forward.loss_chunk_size,
                                     dtype=hidden.dtype, temperature=temperature, logit_bias=logit_bias,
                                     return_entropy=True)
        return from_target_positions(batch, length, *out)
    return token_logprobs(forward.logits(params, batch), targets, temperature=temperature, logit_bias=logit_bias,
                          return_entropy=True)


def loss_weight_count(loss_config: PolicyLossConfig, mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """What the aggregation averages over: tokens (token-mean), sequences (sequence-*), or 1 (sum),
    so accumulating micro-batches weighted by count/total equals one big batch."""
    if loss_config.aggregation == "sum":
        return jnp.ones((), jnp.float32)
    if loss_config.aggregation == "token-mean":
        return jnp.sum(mask != 0).astype(jnp.float32)
    # sequence aggregations: rows (or packed segments) with at least one loss token
    one_hot = segment_ids[..., None] == jnp.arange(1, loss_config.max_segments_per_row + 1)
    has_tokens = jnp.einsum("bl,bls->bs", (mask != 0).astype(jnp.float32), one_hot.astype(jnp.float32)) > 0
    return jnp.sum(has_tokens).astype(jnp.float32)


def _drift_stats(logprobs, shifted, mask, max_turns_logged: int) -> dict:
    drift = jnp.abs(jax.lax.stop_gradient(logprobs) - shifted["rollout_logprobs"])
    turn_one_hot = (shifted["turn_ids"][..., None] == jnp.arange(max_turns_logged)) & (mask[..., None] != 0)
    return {"drift_sum": jnp.sum(masked(drift, mask)), "drift_max": jnp.max(jnp.where(mask != 0, drift, 0.0)),
            "turn_drift_sum": jnp.einsum("bl,blk->k", masked(drift, mask), turn_one_hot.astype(jnp.float32)),
            "turn_tokens": jnp.sum(turn_one_hot, axis=(0, 1)).astype(jnp.float32)}


def rl_loss(forward: Forward, loss_config: PolicyLossConfig, *, max_turns_logged: int = 8,
            temperature: float = 1.0, logit_bias: tuple = ()) -> StepLoss:
    def totals(batches):
        counts = jax.vmap(lambda b: loss_weight_count(loss_config, shifted_rl_inputs(b)["loss_mask"],
                                                      b["segment_ids"]))(batches)
        return jnp.maximum(jnp.sum(counts), 1.0)

    def loss(params, micro, total_count):
        shifted = shifted_rl_inputs(micro)
        mask = shifted["loss_mask"]
        logprobs, entropy = trainer_logprobs(params, micro, shifted["targets"], forward, temperature=temperature,
                                             logit_bias=logit_bias)
        rollout = shifted["rollout_logprobs"]
        value, metrics = compute_policy_loss(
            loss_config, logprobs, shifted.get("old_logprobs", rollout), shifted["advantages"], mask,
            rollout_logprobs=rollout if loss_config.tis_cap is not None else None,
            ref_logprobs=shifted.get("ref_logprobs"), segment_ids=micro["segment_ids"])
        weight = (loss_weight_count(loss_config, mask, micro["segment_ids"]) / total_count
                  if loss_config.aggregation != "sum" else jnp.ones((), jnp.float32))
        stats = dict(_drift_stats(logprobs, shifted, mask, max_turns_logged), metrics=metrics,
                     tokens=jnp.sum(mask != 0).astype(jnp.float32),
                     entropy_sum=jnp.sum(masked(jax.lax.stop_gradient(entropy), mask)))
        return value * weight, stats

    def summarize(losses, stats, _, batches):
        tokens = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
        token_share = stats["tokens"] / tokens  # per micro-batch, to average its mean metrics
        metrics = {name: jnp.sum(values * token_share) for name, values in stats["metrics"].items()
                   if name not in _PER_MICRO_EXTREMES}
        turn_tokens = jnp.sum(stats["turn_tokens"], axis=0)
        turn_drift = jnp.sum(stats["turn_drift_sum"], axis=0) / jnp.maximum(turn_tokens, 1.0)
        metrics.update({f"drift_turn_{k}": turn_drift[k] for k in range(max_turns_logged)})
        return dict(metrics, loss=jnp.sum(losses), loss_tokens=jnp.sum(stats["tokens"]),
                    tokens=jnp.sum(batches["segment_ids"] > 0).astype(jnp.float32),
                    ratio_min=jnp.min(stats["metrics"]["ratio_min"]), ratio_max=jnp.max(stats["metrics"]["ratio_max"]),
                    entropy=jnp.sum(stats["entropy_sum"]) / tokens, drift_mean=jnp.sum(stats["drift_sum"]) / tokens,
                    drift_max=jnp.max(stats["drift_max"]))

    return StepLoss(totals, loss, summarize)


def make_rl_step(forward: Forward, optimizer, schedule, loss_config: PolicyLossConfig, view: ParamsView | None = None,
                 *, max_turns_logged: int = 8, temperature: float = 1.0, logit_bias: tuple = (), **kwargs):
    """-> jitted step(state, batches [A, ...]) -> (state, metrics of fp32 scalars); kwargs: make_update_step's.
    Metrics: loss, policy_loss, clip_fraction (and the loss's other indicators), entropy, drift_mean / drift_max
    (|trainer - vLLM| logprob on sampled tokens, pre-update params), drift_turn_<k>, kl_to_ref (with
    ref_logprobs), ratio stats, grad_norm, learning_rate, loss_tokens. temperature, logit_bias: the rollouts'
    sampling (agent_loop.trainer_logit_bias); every logprob is scored under it (servers reporting processed
    logprobs, ServerConfig.logprobs_mode; raw ones are T=1)."""
    loss = rl_loss(forward, loss_config, max_turns_logged=max_turns_logged, temperature=temperature,
                   logit_bias=logit_bias)
    return make_update_step(loss, optimizer, schedule, view or ParamsView(forward.dtype), **kwargs)


def make_score_batches(forward: Forward, view: ParamsView | None = None, *, temperature: float = 1.0,
                       logit_bias: tuple = (), mesh=None):
    """-> jitted score(params, lora, batches [A, ...]) -> trainer logprobs fp32 [A, B, L] aligned with the
    tokens (index t = logprob of token t; 0 at t = 0), one forward per micro-batch: the old policy's logprobs
    (before the first update of an RL step) and the reference policy's (KL; lora None = the base model)."""
    view = view or ParamsView(forward.dtype)

    def score_one(params, batch):
        logprobs, _ = trainer_logprobs(params, batch, shift_left(batch["input_ids"]), forward, temperature=temperature,
                                       logit_bias=logit_bias)
        return jnp.concatenate([jnp.zeros_like(logprobs[:, :1]), logprobs[:, :-1]], axis=1)

    def score(params, lora, batches):
        full = view.of(params, lora)
        return jax.lax.map(lambda micro: score_one(full, micro), device_keys(batches))

    return jax.jit(traced_under_mesh(score, mesh))
