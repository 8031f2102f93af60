"""The SFT loss for the shared step (train/step.py): masked next-token cross-entropy.

Summed over every target token of all micro-batches and divided by their total count, so gradient
accumulation over A micro-batches gives the same update as one batch A times larger (up to float summation).

Batch layout (a dict of arrays with a leading micro-batch axis A, built by data/collate.py):
  input_ids int32 [A, B, L], segment_ids int32 [A, B, L], position_ids int32 [A, 3, B, L],
  loss_mask float32 [A, B, L] (1 where token t is a target, predicted from tokens < t),
  optionally target_positions int32 [A, B, T] (losses/target_positions.py),
  and when images are present pixel_values + the vision_* arrays (models/inputs.py).
Metrics: loss (mean NLL per target token), target_tokens, tokens (non-padding), grad_norm, learning_rate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_vl.activation_sharding import traced_under_mesh
from jaxrl_vl.losses.fused_nll import chunked_weighted_nll
from jaxrl_vl.losses.sft import chunked_token_logprobs, cross_entropy_loss, token_logprobs
from jaxrl_vl.losses.target_positions import at_target_positions
from jaxrl_vl.train.step import Forward, ParamsView, StepLoss, device_keys, make_update_step


def shifted_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(targets [B, L], weights [B, L]): position t predicts token t+1 with weight loss_mask[t+1];
    the last position predicts nothing."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    # a packed row's next segment starts a new example: never predict across the boundary
    same_segment = jnp.concatenate([batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1],
                                    jnp.zeros_like(input_ids[:, :1], bool)], axis=1)
    return targets, jnp.where(same_segment, weights, 0.0).astype(jnp.float32)


def target_logprobs(params: dict, batch: dict, forward: Forward) -> tuple[jax.Array, jax.Array]:
    """-> (logprobs of the next tokens fp32 [B, L], weights [B, L]) for one (micro-)batch."""
    targets, weights = shifted_targets(batch)
    if forward.loss_chunk_size > 0:
        hidden = forward.hidden(params, batch)
        logprobs = chunked_token_logprobs(hidden, forward.unembedding(params), targets,
                                          chunk_size=forward.loss_chunk_size, dtype=hidden.dtype)
    else:
        logprobs = token_logprobs(forward.logits(params, batch), targets)
    return logprobs, weights


def target_nll_sum(params: dict, batch: dict, forward: Forward, *, divisor) -> jax.Array:
    """sum of the next tokens' weighted NLL / divisor, for one (micro-)batch. Chunked with a plain unembedding
    matrix: the fused loss (its gradient formed in the forward pass, losses/fused_nll.py); chunked, logits
    only at the batch's `target_positions` when it has them."""
    if forward.loss_chunk_size <= 0:
        logprobs, weights = target_logprobs(params, batch, forward)
        return cross_entropy_loss(logprobs, weights, reduction="sum") / divisor
    targets, weights = shifted_targets(batch)
    hidden, targets, weights = at_target_positions(batch, forward.hidden(params, batch), targets, weights)
    unembed = forward.unembedding(params)
    if callable(unembed):  # LoRA on lm_head: logprobs first, their gradient in the backward
        logprobs = chunked_token_logprobs(hidden, unembed, targets, chunk_size=forward.loss_chunk_size,
                                          dtype=hidden.dtype)
        return cross_entropy_loss(logprobs, weights, reduction="sum") / divisor
    return chunked_weighted_nll(hidden, unembed, targets, weights / divisor, chunk_size=forward.loss_chunk_size,
                                dtype=hidden.dtype)


def sft_loss(forward: Forward) -> StepLoss:
    def totals(batches):
        weights = jax.vmap(lambda b: shifted_targets(b)[1])(batches)
        return jnp.maximum(jnp.sum(weights != 0), 1).astype(jnp.float32)

    def loss(params, micro, total_targets):
        return target_nll_sum(params, micro, forward, divisor=total_targets), {}

    def summarize(losses, _, total_targets, batches):
        return {"loss": jnp.sum(losses), "target_tokens": total_targets,
                "tokens": jnp.sum(batches["segment_ids"] > 0).astype(jnp.float32)}

    return StepLoss(totals, loss, summarize)


def make_sft_step(forward: Forward, optimizer, schedule, view: ParamsView | None = None, **kwargs):
    """-> jitted step(state, batches [A, ...]) -> (state, metrics); kwargs: make_update_step's."""
    return make_update_step(sft_loss(forward), optimizer, schedule, view or ParamsView(forward.dtype), **kwargs)


def make_eval_nll(forward: Forward, view: ParamsView | None = None, *, mesh=None):
    """-> jitted nll(params, lora, batch [B, ...]) -> (sum of target NLL, number of targets)."""
    view = view or ParamsView(forward.dtype)

    def nll(params, lora, batch):
        logprobs, weights = target_logprobs(view.of(params, lora), device_keys(batch), forward)
        return cross_entropy_loss(logprobs, weights, reduction="sum"), jnp.sum(weights != 0).astype(jnp.float32)

    return jax.jit(traced_under_mesh(nll, mesh))
