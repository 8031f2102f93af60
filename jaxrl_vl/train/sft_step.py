"""The SFT training step: one pure jitted function (state, micro-batches) -> (state, metrics).

Loss: masked next-token cross-entropy, summed over every target token of all micro-batches and
divided by their total count, so gradient accumulation over A micro-batches gives the same
update as one batch A times larger (up to float summation order).

Batch layout (a dict of arrays with a leading micro-batch axis A, built by train/batches.py):
  input_ids int32 [A, B, L], segment_ids int32 [A, B, L], position_ids int32 [A, 3, B, L],
  loss_mask float32 [A, B, L] (1 where token t is a target, predicted from tokens < t),
  optionally target_positions int32 [A, B, T] (where the chunked loss computes logits; see at_target_positions),
  and when images are present pixel_values float32 [A, P, D] + the vision_* arrays [A, P, ...].
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_vl import models, sharding
from jaxrl_vl.activation_sharding import traced_under_mesh
from jaxrl_vl.losses.fused_nll import chunked_weighted_nll
from jaxrl_vl.losses.sft import chunked_token_logprobs, cross_entropy_loss, token_logprobs
from jaxrl_vl.train.state import TrainState, with_trainable

FSDP_GATHERS = ("use", "step")


def compute_copy(tree, dtype):
    """The float32 matrices (ndim >= 2) of `tree` in the compute dtype; norms, biases and scalars unchanged.
    Cast once per step instead of at every use, so FSDP gathers the smaller copy."""
    return jax.tree.map(lambda a: a.astype(dtype) if a.ndim >= 2 and a.dtype == jnp.float32 else a, tree)


# Host-side keys that the jitted model never reads (their shapes vary with the image count).
HOST_ONLY_KEYS = ("image_grid_thw", "num_examples")


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares) over all leaves, in fp32 (the norm clip_by_global_norm compares)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


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


def target_logprobs(params: dict, batch: dict, model_config, *, dtype=jnp.float32, remat: str = "none",
                    loss_chunk_size: int = 0, layer_loop: str = "scan") -> tuple[jax.Array, jax.Array]:
    """-> (logprobs of the next tokens fp32 [B, L], weights [B, L]) for one (micro-)batch."""
    targets, weights = shifted_targets(batch)
    if loss_chunk_size > 0:
        hidden = models.apply(params, batch, model_config, dtype=dtype, remat=remat, return_hidden=True,
                              layer_loop=layer_loop)
        logprobs = chunked_token_logprobs(hidden, models.unembedding(params, model_config), targets,
                                          chunk_size=loss_chunk_size, dtype=hidden.dtype)
    else:
        logits = models.apply(params, batch, model_config, dtype=dtype, remat=remat, layer_loop=layer_loop)
        logprobs = token_logprobs(logits, targets)
    return logprobs, weights


def target_positions(loss_mask: np.ndarray, multiple: int) -> np.ndarray:
    """loss_mask [..., L] -> int32 [..., P]: per row, the positions t whose next token is a target
    (loss_mask[t + 1] != 0), where the loss needs logits; the others skip the [H, V] unembedding matmuls.
    P is the largest count over all rows rounded up to a multiple of `multiple` (few shapes, few recompiles),
    at most L. Rows with fewer targets are padded with L - 1, the last position, which predicts nothing
    (weight 0 in the loss), so padding adds neither loss nor gradient."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    length = loss_mask.shape[-1]
    rows = (np.asarray(loss_mask)[..., 1:] != 0).reshape(-1, length - 1)
    counts = rows.sum(axis=1)
    size = min(length, max(multiple, -(-int(counts.max(initial=0)) // multiple) * multiple))
    out = np.full((rows.shape[0], size), length - 1, np.int32)
    for row, mask in enumerate(rows):
        positions = np.flatnonzero(mask)
        out[row, :len(positions)] = positions
    return out.reshape(*loss_mask.shape[:-1], size)


def loss_target_positions_multiple(train_config) -> int:
    """train.target_positions_multiple where it applies: target positions need the chunked loss
    (train.loss_chunk_size > 0); 0 otherwise."""
    return train_config.target_positions_multiple if train_config.loss_chunk_size > 0 else 0


def at_target_positions(batch: dict, hidden: jax.Array, *per_token: jax.Array) -> tuple:
    """hidden [B, L, H] and per-token arrays [B, L] -> the same at batch["target_positions"] [B, T] only (the
    positions whose next token is a target, `target_positions`), when the batch has them: the
    unembedding matmuls and the softmax then skip prompts, images and padding."""
    if "target_positions" not in batch:
        return (hidden, *per_token)
    positions = batch["target_positions"]
    return (jnp.take_along_axis(hidden, positions[..., None], axis=1),
            *(jnp.take_along_axis(x, positions, axis=1) for x in per_token))


def from_target_positions(batch: dict, length: int, *values: jax.Array) -> tuple:
    """Per-position values [B, T] at batch["target_positions"] -> [B, L], 0 at every other position (which
    carries no loss); without target positions the values as they are (the inverse of at_target_positions).
    The padding entries all point at L - 1, whose value is never used."""
    if "target_positions" not in batch:
        return values
    positions = batch["target_positions"]
    rows = jnp.arange(positions.shape[0])[:, None]
    return tuple(jnp.zeros((positions.shape[0], length), x.dtype).at[rows, positions].set(x) for x in values)


def target_nll_sum(params: dict, batch: dict, model_config, *, divisor, dtype=jnp.float32, remat: str = "none",
                   loss_chunk_size: int = 0, layer_loop: str = "scan") -> jax.Array:
    """sum of the next tokens' weighted NLL / divisor, for one (micro-)batch. Chunked with a plain unembedding
    matrix: the fused loss (its gradient formed in the forward pass, losses/fused_nll.py); chunked, logits
    only at the batch's `target_positions` when it has them."""
    if loss_chunk_size <= 0:
        logprobs, weights = target_logprobs(params, batch, model_config, dtype=dtype, remat=remat,
                                            layer_loop=layer_loop)
        return cross_entropy_loss(logprobs, weights, reduction="sum") / divisor
    targets, weights = shifted_targets(batch)
    hidden = models.apply(params, batch, model_config, dtype=dtype, remat=remat, return_hidden=True,
                          layer_loop=layer_loop)
    hidden, targets, weights = at_target_positions(batch, hidden, targets, weights)
    unembed = models.unembedding(params, model_config)
    if callable(unembed):  # LoRA on lm_head: logprobs first, their gradient in the backward
        logprobs = chunked_token_logprobs(hidden, unembed, targets, chunk_size=loss_chunk_size, dtype=hidden.dtype)
        return cross_entropy_loss(logprobs, weights, reduction="sum") / divisor
    return chunked_weighted_nll(hidden, unembed, targets, weights / divisor, chunk_size=loss_chunk_size,
                                dtype=hidden.dtype)


def make_sft_step(model_config, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                  dtype=jnp.float32, remat: str = "none", layer_loop: str = "scan", loss_chunk_size: int = 0,
                  lora_overlay: Callable | None = None, donate: bool = True, state_shardings=None,
                  metrics_sharding=None, mesh=None, fsdp_gather: str = "use"):
    """-> jitted step(state: TrainState, batches: dict [A, ...]) -> (TrainState, metrics dict).

    lora_overlay: (params, lora) -> params with the LoRA tree inserted (models.lora.overlay bound to
      its LoraConfig); when given, gradients flow to `state.lora` only.
    state_shardings / metrics_sharding: output shardings (a TrainState of shardings, e.g. from
      `state_shardings(state)`, and one sharding for all metrics); fixing them keeps the state's
      placement identical across steps, so the step compiles once.
    mesh: the device mesh the state and batches live on; the step is traced under it so the model's
      activations stay split by batch (jaxrl_vl.activation_sharding). None: one device.
    fsdp_gather: "use": XLA gathers each sharded weight where it is used, again in the backward (ZeRO-3);
      "step": the weights' compute-dtype copy is gathered once per micro-batch and kept for the backward, its
      gradient reduce-scattered (sharding.gathered_once; PyTorch FSDP's SHARD_GRAD_OP, one model copy of memory).
    Metrics (fp32 scalars): loss (mean NLL per target token), target_tokens, tokens (non-padding),
      grad_norm (before clipping), learning_rate (used for this update).
    """

    if fsdp_gather not in FSDP_GATHERS:
        raise ValueError(f"fsdp_gather={fsdp_gather!r}; choose one of {FSDP_GATHERS}")
    gather_once = fsdp_gather == "step" and mesh is not None and mesh.shape["fsdp"] > 1

    def full_params(state_params, trainable):
        params = trainable if lora_overlay is None else lora_overlay(state_params, trainable)
        return sharding.gathered_once(compute_copy(params, dtype), mesh) if gather_once else params

    def micro_nll_sum(trainable, frozen_params, micro_batch, total_targets):
        return target_nll_sum(full_params(frozen_params, trainable), micro_batch, model_config, divisor=total_targets,
                              dtype=dtype, remat=remat, loss_chunk_size=loss_chunk_size, layer_loop=layer_loop)

    grad_fn = jax.value_and_grad(micro_nll_sum)

    def step(state: TrainState, batches: dict):
        batches = {k: v for k, v in batches.items() if k not in HOST_ONLY_KEYS}
        target_weights = jax.vmap(lambda b: shifted_targets(b)[1])(batches)
        total_targets = jnp.maximum(jnp.sum(target_weights != 0), 1).astype(jnp.float32)
        frozen = state.params if lora_overlay is not None else None

        def body(carry, micro_batch):
            loss_sum, grads_sum = carry
            loss, grads = grad_fn(state.trainable, frozen, micro_batch, total_targets)
            return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), batches)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new_state = with_trainable(state, optax.apply_updates(state.trainable, updates), opt_state)
        metrics = {
            "loss": loss,
            "target_tokens": total_targets,
            "tokens": jnp.sum(batches["segment_ids"] > 0).astype(jnp.float32),
            "grad_norm": global_norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        }
        return new_state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, metrics_sharding)
    return jax.jit(traced_under_mesh(step, mesh), donate_argnums=(0,) if donate else (),
                   out_shardings=out_shardings)


def make_eval_nll(model_config, *, dtype=jnp.float32, loss_chunk_size: int = 0,
                  lora_overlay: Callable | None = None, mesh=None):
    """-> jitted nll(params, lora, batch [B, ...]) -> (sum of target NLL, number of targets).
    mesh: as in make_sft_step."""

    def nll(params, lora, batch):
        batch = {k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}
        if lora_overlay is not None:
            params = lora_overlay(params, lora)
        logprobs, weights = target_logprobs(params, batch, model_config, dtype=dtype,
                                            loss_chunk_size=loss_chunk_size)
        return cross_entropy_loss(logprobs, weights, reduction="sum"), jnp.sum(weights != 0).astype(jnp.float32)

    return jax.jit(traced_under_mesh(nll, mesh))
