"""Logits only where the loss needs them: the positions whose next token is a target.

A training row's loss covers a fraction of its positions (the assistant's tokens; not prompts, images or
padding), but the unembedding matmuls [H, V] and the softmax cost the same at every position. The collate
lists, per row, the positions t whose next token is a target (`target_positions`, host side); the losses gather
the hidden states there before the chunked loss (`at_target_positions`) and scatter per-position results
back (`from_target_positions`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def target_positions(loss_mask: np.ndarray, multiple: int, size: int | None = None) -> np.ndarray:
    """loss_mask [..., L] -> int32 [..., P]: per row, the positions t whose next token is a target
    (loss_mask[t + 1] != 0), where the loss needs logits; the others skip the [H, V] unembedding matmuls.
    P is the largest count over all rows rounded up to a multiple of `multiple` (few shapes, few recompiles),
    at most L. Rows with fewer targets are padded with L - 1, the last position, which predicts nothing
    (weight 0 in the loss), so padding adds neither loss nor gradient. `size`: P given (agreed across processes,
    see positions_size); at least what this batch needs."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    length = loss_mask.shape[-1]
    rows = (np.asarray(loss_mask)[..., 1:] != 0).reshape(-1, length - 1)
    needed = positions_size(int(rows.sum(axis=1).max(initial=0)), length, multiple)
    if size is not None and size < needed:
        raise ValueError(f"size={size} < the {needed} target positions this batch needs")
    size = needed if size is None else size
    out = np.full((rows.shape[0], size), length - 1, np.int32)
    for row, mask in enumerate(rows):
        positions = np.flatnonzero(mask)
        out[row, :len(positions)] = positions
    return out.reshape(*loss_mask.shape[:-1], size)


def positions_size(count: int, length: int, multiple: int) -> int:
    """P for a batch whose fullest row has `count` targets: rounded up to `multiple`, at least one multiple,
    at most L (what several processes agree on before padding: the max of their sizes is again such a P)."""
    return min(length, max(multiple, -(-count // multiple) * multiple))


def at_target_positions(batch: dict, hidden: jax.Array, *per_token: jax.Array) -> tuple:
    """hidden [B, L, H] and per-token arrays [B, L] -> the same at batch["target_positions"] [B, T] only, when
    the batch has them: the unembedding matmuls and the softmax then skip prompts, images and padding."""
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
