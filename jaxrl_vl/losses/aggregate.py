"""Loss aggregation: per-token values [B, L] -> one scalar.

A "sequence" is one packed example: the tokens of one row sharing a segment id (1..S; 0 is
padding). Without `segment_ids` every row is one sequence. Modes:
  token-mean               sum(x m) / sum(m)                   every token weighs the same (DAPO)
  sequence-mean            mean_seq( sum_seq(x m) / sum_seq(m) )  every sequence weighs the same (GRPO)
  sequence-mean-token-sum  mean_seq( sum_seq(x m) ) / divisor  no length normalisation (Dr.GRPO:
                           divisor = a constant such as the max generation length)
  sum                      sum(x m)                            Tinker's convention
Sequences without any masked-in token are left out of sequence means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vl.losses.registry import AGGREGATIONS


def masked(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x * mask, but exactly 0 where mask == 0 even if x is inf/nan there (padding)."""
    return jnp.where(mask != 0, x * mask, 0.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over positions where mask != 0 (0 when the mask is empty)."""
    return jnp.sum(masked(x, mask)) / jnp.maximum(jnp.sum(mask != 0), 1)


def masked_min_max(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(min, max) of x over positions where mask != 0; (0, 0) when the mask is empty, never +-inf."""
    present = mask != 0
    some = jnp.any(present)
    return (jnp.where(some, jnp.min(jnp.where(present, x, jnp.inf)), 0.0),
            jnp.where(some, jnp.max(jnp.where(present, x, -jnp.inf)), 0.0))


def sequence_sums(x: jax.Array, segment_ids: jax.Array | None,
                  max_segments_per_row: int = 1) -> jax.Array:
    """Per-sequence sums. x: [B, L]; segment_ids: int [B, L] or None -> [B, S].

    S = max_segments_per_row (static). Segment ids above S are silently ignored under jit, so
    check them host-side (`check_segment_ids`) when building the batch.
    """
    if segment_ids is None:
        return jnp.sum(x, axis=-1, keepdims=True)
    one_hot = segment_ids[..., None] == jnp.arange(1, max_segments_per_row + 1)  # [B, L, S]
    return jnp.einsum("bl,bls->bs", x, one_hot.astype(x.dtype))


def check_segment_ids(segment_ids, max_segments_per_row: int) -> None:
    """Host-side guard: every segment id must fit in max_segments_per_row."""
    try:
        values = np.asarray(segment_ids)
    except jax.errors.TracerArrayConversionError:
        return  # inside jit: values unknown here; the batch builder's check must hold
    largest = int(values.max()) if values.size else 0
    if largest > max_segments_per_row:
        raise ValueError(
            f"segment_ids go up to {largest} but max_segments_per_row={max_segments_per_row}; "
            f"raise max_segments_per_row to at least {largest}")


def _per_sequence(per_token, loss_mask, segment_ids, max_segments_per_row):
    """-> (sum of masked values [B, S], token count [B, S])."""
    mask = (loss_mask != 0).astype(jnp.float32)
    sums = sequence_sums(masked(per_token, loss_mask), segment_ids, max_segments_per_row)
    counts = sequence_sums(mask, segment_ids, max_segments_per_row)
    return sums, counts


@AGGREGATIONS.register("token-mean")
def token_mean(per_token, loss_mask, segment_ids=None, max_segments_per_row=1,
               token_sum_divisor=1.0):
    return masked_mean(per_token, loss_mask)


@AGGREGATIONS.register("sum")
def token_sum(per_token, loss_mask, segment_ids=None, max_segments_per_row=1,
              token_sum_divisor=1.0):
    return jnp.sum(masked(per_token, loss_mask))


@AGGREGATIONS.register("sequence-mean")
def sequence_mean(per_token, loss_mask, segment_ids=None, max_segments_per_row=1,
                  token_sum_divisor=1.0):
    sums, counts = _per_sequence(per_token, loss_mask, segment_ids, max_segments_per_row)
    present = counts > 0
    per_sequence = jnp.where(present, sums / jnp.maximum(counts, 1.0), 0.0)
    return jnp.sum(per_sequence) / jnp.maximum(jnp.sum(present), 1)


@AGGREGATIONS.register("sequence-mean-token-sum")
def sequence_mean_token_sum(per_token, loss_mask, segment_ids=None, max_segments_per_row=1,
                            token_sum_divisor=1.0):
    sums, counts = _per_sequence(per_token, loss_mask, segment_ids, max_segments_per_row)
    present = counts > 0
    return jnp.sum(jnp.where(present, sums, 0.0)) / jnp.maximum(jnp.sum(present), 1) \
        / token_sum_divisor


def aggregate(mode: str, per_token: jax.Array, loss_mask: jax.Array, *,
              segment_ids: jax.Array | None = None, max_segments_per_row: int = 1,
              token_sum_divisor: float = 1.0) -> jax.Array:
    """per_token, loss_mask: [B, L] -> scalar, by `mode` (see module docstring)."""
    return AGGREGATIONS.get(mode)(per_token, loss_mask, segment_ids, max_segments_per_row,
                                  token_sum_divisor)


def broadcast_to_tokens(per_sequence: jax.Array, segment_ids: jax.Array | None,
                        length: int) -> jax.Array:
    """Inverse of `sequence_sums`' layout: per_sequence [B, S] -> per-token [B, L] (0 on padding
    segments when segment_ids is given)."""
    if segment_ids is None:
        return jnp.broadcast_to(per_sequence[:, :1], (per_sequence.shape[0], length))
    num_segments = per_sequence.shape[1]
    one_hot = segment_ids[..., None] == jnp.arange(1, num_segments + 1)  # [B, L, S]
    return jnp.einsum("bs,bls->bl", per_sequence, one_hot.astype(per_sequence.dtype))
