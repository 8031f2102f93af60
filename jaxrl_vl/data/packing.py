"""Bin packing of sequences into rows of a token budget, and micro-batches sized by tokens.

Pure Python over lengths (no arrays). Rows are bins of `capacity` tokens; items are sequences (SFT
examples, RL episode segments). Merging the packed items into one model row is data/batching.py's
`merge_rows`; M-RoPE positions restart per segment there (models.inputs.make_batch).

    first_fit(used, n, capacity)                        streaming: the first row with room (SFT pipeline)
    pack_first_fit(lengths, capacity)                   every item in order into the first row with room
    pack_first_fit_decreasing(lengths, capacity, ...)   longest first (all lengths known: an RL batch)
    micro_batch_layout(num_rows, row_length, tokens)    rows per micro-batch from a token budget
"""
from __future__ import annotations

from collections.abc import Sequence


def first_fit(row_token_counts: Sequence[int], num_tokens: int, row_length: int) -> int | None:
    """Index of the first row with room for num_tokens, or None."""
    for index, used in enumerate(row_token_counts):
        if used + num_tokens <= row_length:
            return index
    return None


def _check_fits(lengths: Sequence[int], capacity: int) -> None:
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"sequence {index} has {length} tokens > row_length {capacity}; truncate it or "
                             "raise row_length")


def _pack(order: Sequence[int], lengths: Sequence[int], capacity: int, max_items_per_bin: int | None):
    rows: list[list[int]] = []
    used: list[int] = []  # tokens per row; a row holding max_items_per_bin items counts as full
    for index in order:
        target = first_fit(used, lengths[index], capacity)
        if target is None:
            rows.append([index])
            used.append(lengths[index])
            target = len(rows) - 1
        else:
            rows[target].append(index)
            used[target] += lengths[index]
        if max_items_per_bin is not None and len(rows[target]) >= max_items_per_bin:
            used[target] = capacity + 1
    return rows


def pack_first_fit(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Item indices grouped into rows of at most row_length tokens (first fit, order kept in a row)."""
    _check_fits(lengths, row_length)
    return _pack(range(len(lengths)), lengths, row_length, None)


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int,
                              max_items_per_bin: int | None = None) -> list[list[int]]:
    """Item indices grouped into rows of at most `capacity` tokens and `max_items_per_bin` items
    (the loss's max_segments_per_row): longest first, each into the first row with room. First-fit
    decreasing uses at most 11/9 of the optimal number of rows + 1. Rows in the order they were
    opened; items inside a row in index order (a row's segments keep the batch's episode order)."""
    if max_items_per_bin is not None and max_items_per_bin < 1:
        raise ValueError(f"max_items_per_bin={max_items_per_bin} must be >= 1")
    _check_fits(lengths, capacity)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [sorted(row) for row in _pack(order, lengths, capacity, max_items_per_bin)]


def padding_fraction(row_token_counts: Sequence[int], row_length: int, num_rows: int | None = None) -> float:
    """Pad tokens / all tokens when `num_rows` rows (default: one per count; more = filler rows) are
    padded to row_length."""
    num_rows = len(row_token_counts) if num_rows is None else num_rows
    total = num_rows * row_length
    return 1.0 - sum(row_token_counts) / total if total else 0.0


def micro_batch_layout(num_rows: int, row_length: int, tokens_per_micro_batch: int) -> tuple[int, int]:
    """(num_micro_batches, rows_per_micro_batch) for `num_rows` rows of `row_length` tokens when a
    micro-batch holds tokens_per_micro_batch tokens (at least one row): micro-batches by tokens, so
    packing more episodes per row means fewer micro-batches, not fuller padding."""
    if row_length < 1 or tokens_per_micro_batch < 1:
        raise ValueError(f"row_length={row_length} and tokens_per_micro_batch={tokens_per_micro_batch} must be >= 1")
    rows_per_micro_batch = max(1, tokens_per_micro_batch // row_length)
    return max(1, -(-num_rows // rows_per_micro_batch)), rows_per_micro_batch
