"""The RL update: one jitted function (state, micro-batches) -> (state, metrics).

Batch (built by rl_loop from trajectory.training_rows + models.make_batch, stacked on a leading
micro-batch axis A): input_ids, segment_ids [A, B, L], position_ids [A, 3, B, L], vision arrays,
and per-token arrays aligned with the tokens (index t describes token t):
  loss_mask        float32 [A, B, L]  1 on tokens vLLM sampled
  rollout_logprobs float32 [A, B, L]  vLLM's logprobs of those tokens
  advantages       float32 [A, B, L]  the trajectory's advantage on its sampled tokens
  turn_ids         int32   [A, B, L]  episode turn of each sampled token (-1 elsewhere)
  ref_logprobs     float32 [A, B, L]  optional: frozen reference policy (KL); shifted like the others
  target_positions int32   [A, B, T]  optional: where the chunked loss computes logits (build_micro_batches)
Position t of the model predicts token t+1, so every per-token array is shifted left by one
before the loss (as in sft_step.shifted_targets).

The ratio's denominator ("old" policy) is vLLM's logprobs (`old_logprobs="rollout"`), or the
trainer's own logprobs at the pre-update params (`"trainer"`, stop-gradient; with `tis_cap` the
loss is then reweighted by the truncated trainer/rollout ratio). Drift metrics compare the
trainer's logprobs at the pre-update params with vLLM's: with weights pushed after every update
and the exact rendered inputs, their mean absolute difference stays ~1e-6 in fp32.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import jax.numpy as jnp
import optax

from jaxrl_vl import models
from jaxrl_vl.activation_sharding import traced_under_mesh
from jaxrl_vl.losses.aggregate import masked
from jaxrl_vl.losses.policy import PolicyLossConfig, compute_policy_loss
from jaxrl_vl.losses.sft import chunked_token_logprobs, token_logprobs
from jaxrl_vl.models.vision_inputs import slot_shape
from jaxrl_vl.train.sft_step import at_target_positions, from_target_positions, target_positions
from jaxrl_vl.train.state import TrainState, with_trainable

HOST_ONLY_KEYS = ("image_grid_thw", "group_id", "num_examples")
OLD_LOGPROBS_SOURCES = ("rollout", "trainer")
SHIFTED_KEYS = ("loss_mask", "rollout_logprobs", "advantages", "turn_ids", "ref_logprobs")


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


def trainer_logprobs(params: dict, batch: dict, targets: jax.Array, model_config, *, dtype=jnp.float32,
                     remat: str = "none", loss_chunk_size: int = 0, layer_loop: str = "scan",
                     temperature: float = 1.0, logit_bias: tuple = ()):
    """-> (logprobs fp32 [B, L], entropy fp32 [B, L]) of `targets` under softmax((logits + logit_bias) /
    temperature): the distribution vLLM sampled from, as its processed logprobs report (its raw ones are
    temperature 1 without bias). Chunked with batch["target_positions"]: logits at those positions only, 0
    elsewhere (sft_step.at_target_positions)."""
    if loss_chunk_size > 0:
        hidden = models.apply(params, batch, model_config, dtype=dtype, remat=remat, return_hidden=True,
                              layer_loop=layer_loop)
        length = targets.shape[1]
        hidden, targets = at_target_positions(batch, hidden, targets)
        out = chunked_token_logprobs(hidden, models.unembedding(params, model_config), targets,
                                     chunk_size=loss_chunk_size, dtype=hidden.dtype, temperature=temperature,
                                     logit_bias=logit_bias, return_entropy=True)
        return from_target_positions(batch, length, *out)
    logits = models.apply(params, batch, model_config, dtype=dtype, remat=remat, layer_loop=layer_loop)
    return token_logprobs(logits, targets, temperature=temperature, logit_bias=logit_bias, return_entropy=True)


def _loss_weight_count(loss_config: PolicyLossConfig, mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """What the aggregation averages over: tokens (token-mean), sequences (sequence-*), or 1 (sum),
    so accumulating micro-batches weighted by count/total equals one big batch."""
    if loss_config.aggregation == "sum":
        return jnp.ones((), jnp.float32)
    if loss_config.aggregation == "token-mean":
        return jnp.sum(mask != 0).astype(jnp.float32)
    # sequence aggregations: rows (or packed segments) with at least one loss token
    s = loss_config.max_segments_per_row
    one_hot = segment_ids[..., None] == jnp.arange(1, s + 1)
    has_tokens = jnp.einsum("bl,bls->bs", (mask != 0).astype(jnp.float32), one_hot.astype(jnp.float32)) > 0
    return jnp.sum(has_tokens).astype(jnp.float32)


def make_rl_step(model_config, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                 loss_config: PolicyLossConfig, *, old_logprobs: str = "rollout", max_turns_logged: int = 8,
                 dtype=jnp.float32, remat: str = "none", loss_chunk_size: int = 0, layer_loop: str = "scan",
                 lora_overlay: Callable | None = None, donate: bool = True, mesh=None, temperature: float = 1.0,
                 logit_bias: tuple = ()):
    """-> jitted step(state, batches [A, ...]) -> (TrainState, metrics dict of fp32 scalars).

    Metrics: loss, policy_loss, clip_fraction (and the policy loss's other indicators), entropy,
    drift_mean / drift_max (|trainer - vLLM| logprob on sampled tokens, pre-update params),
    drift_turn_<k> for k < max_turns_logged, kl_to_ref (with ref_logprobs), ratio stats,
    grad_norm, learning_rate, loss_tokens, sequences.
    mesh: the device mesh state and batches live on (None: one device); the step is traced under it
    so the model's activations stay split by batch (jaxrl_vl.activation_sharding).
    temperature, logit_bias: the rollouts' sampling (agent_loop.trainer_logit_bias); every logprob is scored
    under it. Only with servers reporting processed logprobs (ServerConfig.logprobs_mode); raw ones are T=1.
    """
    if old_logprobs not in OLD_LOGPROBS_SOURCES:
        raise ValueError(f"old_logprobs={old_logprobs!r}; choose one of {OLD_LOGPROBS_SOURCES}")

    def full_params(frozen, trainable):
        return trainable if lora_overlay is None else lora_overlay(frozen, trainable)

    def micro_loss(trainable, frozen, micro, total_count):
        params = full_params(frozen, trainable)
        shifted = shifted_rl_inputs(micro)
        mask = shifted["loss_mask"]
        logprobs, entropy = trainer_logprobs(params, micro, shifted["targets"], model_config, dtype=dtype,
                                             remat=remat, loss_chunk_size=loss_chunk_size, layer_loop=layer_loop,
                                             temperature=temperature, logit_bias=logit_bias)
        rollout = shifted["rollout_logprobs"]
        old = rollout if old_logprobs == "rollout" else jax.lax.stop_gradient(logprobs)
        loss, metrics = compute_policy_loss(
            loss_config, logprobs, old, shifted["advantages"], mask,
            rollout_logprobs=rollout if loss_config.tis_cap is not None else None,
            ref_logprobs=shifted.get("ref_logprobs"), segment_ids=micro["segment_ids"])
        count = _loss_weight_count(loss_config, mask, micro["segment_ids"])
        weight = count / total_count if loss_config.aggregation != "sum" else 1.0
        drift = jnp.abs(jax.lax.stop_gradient(logprobs) - rollout)
        turn_one_hot = (shifted["turn_ids"][..., None] == jnp.arange(max_turns_logged)) & (mask[..., None] != 0)
        stats = {
            "tokens": jnp.sum(mask != 0).astype(jnp.float32),
            "weight": jnp.asarray(weight, jnp.float32),
            "drift_sum": jnp.sum(masked(drift, mask)),
            "drift_max": jnp.max(jnp.where(mask != 0, drift, 0.0)),
            "entropy_sum": jnp.sum(masked(jax.lax.stop_gradient(entropy), mask)),
            "turn_drift_sum": jnp.einsum("bl,blk->k", masked(drift, mask), turn_one_hot.astype(jnp.float32)),
            "turn_tokens": jnp.sum(turn_one_hot, axis=(0, 1)).astype(jnp.float32),
            "metrics": metrics,
        }
        return loss * weight, stats

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batches: dict):
        batches = {k: v for k, v in batches.items() if k not in HOST_ONLY_KEYS}
        counts = jax.vmap(lambda b: _loss_weight_count(
            loss_config, shifted_rl_inputs(b)["loss_mask"], b["segment_ids"]))(batches)
        total_count = jnp.maximum(jnp.sum(counts), 1.0)
        frozen = state.params if lora_overlay is not None else None

        def body(grads_sum, micro):
            (loss, stats), grads = grad_fn(state.trainable, frozen, micro, total_count)
            return jax.tree.map(jnp.add, grads_sum, grads), (loss, stats)

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        grads, (losses, stats) = jax.lax.scan(body, zeros, batches)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new_state = with_trainable(state, optax.apply_updates(state.trainable, updates), opt_state)

        tokens = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
        token_share = stats["tokens"] / tokens  # per micro-batch, to average its mean metrics
        metrics = {name: jnp.sum(values * token_share) for name, values in stats["metrics"].items()
                   if name not in ("ratio_min", "ratio_max", "num_loss_tokens")}
        metrics.update(
            loss=jnp.sum(losses),
            ratio_min=jnp.min(stats["metrics"]["ratio_min"]),
            ratio_max=jnp.max(stats["metrics"]["ratio_max"]),
            loss_tokens=jnp.sum(stats["tokens"]),
            entropy=jnp.sum(stats["entropy_sum"]) / tokens,
            drift_mean=jnp.sum(stats["drift_sum"]) / tokens,
            drift_max=jnp.max(stats["drift_max"]),
            grad_norm=optax.global_norm(grads),
            learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
        )
        turn_tokens = jnp.sum(stats["turn_tokens"], axis=0)
        turn_drift = jnp.sum(stats["turn_drift_sum"], axis=0) / jnp.maximum(turn_tokens, 1.0)
        for k in range(max_turns_logged):
            metrics[f"drift_turn_{k}"] = turn_drift[k]
        return new_state, metrics

    return jax.jit(traced_under_mesh(step, mesh), donate_argnums=(0,) if donate else ())


def make_score_logprobs(model_config, *, dtype=jnp.float32, loss_chunk_size: int = 0,
                        lora_overlay: Callable | None = None, mesh=None, temperature: float = 1.0,
                        logit_bias: tuple = ()):
    """-> jitted score(params, lora, batch [B, ...]) -> trainer logprobs fp32 [B, L] aligned with
    the tokens (index t = logprob of token t; 0 at t = 0), under the sampling `temperature` and `logit_bias`. For the
    old policy, reference-policy KL and checks. mesh: as in make_rl_step."""

    def score(params, lora, batch):
        batch = {k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}
        if lora_overlay is not None:
            params = lora_overlay(params, lora)
        targets = shift_left(batch["input_ids"])
        logprobs, _ = trainer_logprobs(params, batch, targets, model_config, dtype=dtype,
                                       loss_chunk_size=loss_chunk_size, temperature=temperature, logit_bias=logit_bias)
        # the logprob predicting token t sits at t-1: move it to t
        return jnp.concatenate([jnp.zeros_like(logprobs[:, :1]), logprobs[:, :-1]], axis=1)

    return jax.jit(traced_under_mesh(score, mesh))


# ---------------------------------------------------------------------------------------------
# Host side: training rows -> stacked micro-batches with bucketed (few distinct) shapes.


def _round_up(value: int, multiple: int) -> int:
    return -(-max(int(value), 1) // multiple) * multiple


def _filler_row(template: dict, pad_id: int) -> dict:
    """A row that trains nothing (one pad token, loss_mask 0), shaped like `template`'s fields."""
    row = {"input_ids": np.asarray([pad_id], np.int32)}
    for key, value in template.items():
        if key in ("input_ids", "pixel_values", "image_grid_thw"):
            continue
        value = np.asarray(value)
        if value.ndim == 0:
            row[key] = np.zeros((), value.dtype)
        else:
            row[key] = np.full((1,), -1 if key == "turn_ids" else 0, value.dtype)
    return row


def build_micro_batches(rows: list[dict], model_config, *, num_micro_batches: int, length_multiple: int = 128,
                        patch_multiple: int = 64, rows_multiple: int = 1,
                        target_positions_multiple: int = 0) -> dict[str, np.ndarray]:
    """Training rows (trajectory.training_rows) -> one dict of arrays stacked on a leading
    micro-batch axis A = num_micro_batches: input_ids [A, B, L], position_ids [A, 3, B, L],
    pixel_values [A, P, D], ... Rows are dealt round-robin over the A micro-batches and each is padded
    with non-training filler rows to B, rounded up to `rows_multiple`; L and P are rounded up to their
    multiples so jit sees few shapes. target_positions_multiple > 0 adds `target_positions` [A, B, T] (the
    positions a sampled token follows; for the chunked loss, sft_step.target_positions).
    """
    if not rows:
        raise ValueError("build_micro_batches: no rows (every group filtered out?)")
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
    pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else 0
    per_micro = _round_up(-(-len(rows) // num_micro_batches), rows_multiple)
    # rows dealt round-robin, fillers last in each micro-batch: micro-batch i holds a real row whenever
    # i < len(rows), which the RL loop's PPO mini-batches rely on
    filler = _filler_row(rows[0], pad_id)
    groups = [list(rows[i::num_micro_batches]) for i in range(num_micro_batches)]
    groups = [g + [filler] * (per_micro - len(g)) for g in groups]
    rows = [r for g in groups for r in g]
    length = _round_up(max(len(r["input_ids"]) for r in rows), length_multiple)
    merge = model_config.vision.spatial_merge_size ** 2
    patches = max(sum(int(np.prod(r["image_grid_thw"], axis=1).sum()) for r in g if "image_grid_thw" in r)
                  for g in groups)
    pad_patches = _round_up(patches, max(patch_multiple, merge)) if patches else None
    # one vision slot layout for every micro-batch, so their vision_* arrays stack
    grids = [np.concatenate([np.asarray(r["image_grid_thw"]).reshape(-1, 3) for r in g if "image_grid_thw" in r]
                            or [np.zeros((0, 3), np.int64)]) for g in groups]
    slots = slot_shape(model_config.vision, *grids)
    batches = [models.make_batch(g, model_config, pad_to_length=length, pad_patches_to=pad_patches,
                                 vision_slots=slots) for g in groups]
    keys = [k for k in batches[0] if k != "image_grid_thw"]
    stacked = {k: np.stack([b[k] for b in batches]) for k in keys}
    if target_positions_multiple > 0:
        stacked["target_positions"] = target_positions(stacked["loss_mask"], target_positions_multiple)
    return stacked
