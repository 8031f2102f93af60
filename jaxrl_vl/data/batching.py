"""Rendered examples -> model rows: truncation, length buckets, packing (the bin packing: data/packing.py).

A row is the dict `jaxrl_vl.models.inputs.make_batch` takes: input_ids int32[L], loss_mask
float32[L], pixel_values float32[P, D] (normalised), image_grid_thw int32[n, 3], and for packed
rows segment_ids int32[L] (1..k, one per example; M-RoPE positions restart at each segment).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrl_vl.data import packing
from jaxrl_vl.data.packing import first_fit, pack_first_fit  # noqa: F401 (the SFT pipeline's, kept here by name)
from jaxrl_vl.data.render import RenderedExample, normalize_pixels
from jaxrl_vl.data.validation import BadRecordError


def truncate_example(example: RenderedExample, max_length: int, *, truncate: bool = True) -> tuple[RenderedExample, bool]:
    """Keep the first `max_length` tokens. Returns (example, was_truncated).

    Raises BadRecordError ("over-long: ...") when the example is longer and `truncate` is off, when
    the cut would fall inside an image's placeholder run (the image would be half-seen), or when
    no assistant token is left to train on. Images wholly after the cut are dropped with their
    pixels; the assistant turn cut in the middle keeps its first part (no closing `<|im_end|>`).
    """
    length = example.num_tokens
    if length <= max_length:
        return example, False
    if not truncate:
        raise BadRecordError(example.id, f"over-long: {length} tokens > max_length {max_length} (truncation is off)")
    cut = max_length
    for index, (start, end) in enumerate(example.image_spans):
        if start < cut < end:
            raise BadRecordError(example.id, f"over-long: {length} tokens > max_length {max_length} and the cut falls "
                                 f"inside image {index}'s placeholder tokens [{start}, {end}); raise max_length")
    keep_images = int(np.sum(example.image_spans[:, 1] <= cut))
    keep_patches = int(example.image_grid_thw[:keep_images].prod(axis=1).sum())
    spans = example.assistant_spans[example.assistant_spans[:, 0] < cut].copy()
    spans[:, 1] = np.minimum(spans[:, 1], cut)
    if not np.any(spans[:, 1] > spans[:, 0]):
        raise BadRecordError(example.id, f"over-long: {length} tokens > max_length {max_length} and no assistant token "
                             "is left after truncation")
    truncated = dataclasses.replace(
        example, input_ids=example.input_ids[:cut], pixel_values=example.pixel_values[:keep_patches],
        image_grid_thw=example.image_grid_thw[:keep_images], image_spans=example.image_spans[:keep_images],
        assistant_spans=spans)
    return truncated, True


def length_buckets(max_length: int, min_length: int = 64) -> tuple[int, ...]:
    """Powers of two from min_length, capped by (and always ending at) max_length: few shapes, so
    few recompiles, and at most ~2x padding."""
    if max_length <= 0 or min_length <= 0:
        raise ValueError(f"max_length and min_length must be positive, got {max_length}, {min_length}")
    buckets, length = [], min(min_length, max_length)
    while length < max_length:
        buckets.append(length)
        length *= 2
    buckets.append(max_length)
    return tuple(buckets)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= length."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}; truncate first")


def patch_bucket(num_patches: int, min_patches: int = 64) -> int:
    """Pixel-patch count padded up to a power of two (>= min_patches), for stable vision shapes."""
    bucket = min_patches
    while bucket < num_patches:
        bucket *= 2
    return bucket


def example_row(example: RenderedExample, *, loss_on: str, image_mean, image_std) -> dict:
    """One unpacked row (see module docstring)."""
    return {
        "input_ids": example.input_ids,
        "loss_mask": example.loss_mask(loss_on),
        "pixel_values": normalize_pixels(example.pixel_values, image_mean, image_std),
        "image_grid_thw": example.image_grid_thw,
    }


def packed_row(examples: list[RenderedExample], *, loss_on: str, image_mean, image_std) -> dict:
    """Several examples concatenated into one row with segment_ids 1..k (images kept in order)."""
    if not examples:
        raise ValueError("packed_row needs at least one example")
    return merge_rows([example_row(e, loss_on=loss_on, image_mean=image_mean, image_std=image_std) for e in examples])


def merge_rows(rows: list[dict]) -> dict:
    """Rows (the module docstring's dicts, e.g. trajectory.training_rows output) concatenated into one
    packed row: every per-token field end to end, segment_ids 1..k, pixel_values and image_grid_thw in
    order. Per-row scalars (e.g. group_id) have no per-token place and are refused."""
    if not rows:
        raise ValueError("merge_rows needs at least one row")
    keys = [k for k in rows[0] if k not in ("pixel_values", "image_grid_thw")]
    for index, row in enumerate(rows):
        fields = {k for k in row if k not in ("pixel_values", "image_grid_thw")}
        if fields != set(keys):
            raise ValueError(f"merge_rows: row {index} has fields {sorted(fields)}, row 0 {sorted(keys)}")
        for key in keys:
            if key == "segment_ids" or np.ndim(row[key]) == 0:
                raise ValueError(f"merge_rows: row {index} field {key!r} is per-row (or already packed); "
                                 "pack rows before adding it")
    merged = {k: np.concatenate([np.asarray(r[k]) for r in rows]) for k in keys}
    merged["input_ids"] = merged["input_ids"].astype(np.int32)
    merged["segment_ids"] = np.concatenate([np.full(len(r["input_ids"]), k + 1, np.int32) for k, r in enumerate(rows)])
    with_images = [r for r in rows if "image_grid_thw" in r]
    if with_images:
        merged["pixel_values"] = np.concatenate([np.asarray(r["pixel_values"]) for r in with_images]).astype(np.float32)
        merged["image_grid_thw"] = np.concatenate([np.asarray(r["image_grid_thw"]).reshape(-1, 3)
                                                   for r in with_images]).astype(np.int32)
    return merged


def pack_rows(rows: list[dict], *, row_length: int, max_segments_per_row: int) -> list[dict]:
    """Rows packed into as few rows of at most row_length tokens and max_segments_per_row segments as
    first-fit decreasing finds (data/packing.py), each merged with `merge_rows`. For RL training rows:
    the loss's PolicyLossConfig.max_segments_per_row must be at least max_segments_per_row."""
    lengths = [len(r["input_ids"]) for r in rows]
    bins = packing.pack_first_fit_decreasing(lengths, row_length, max_items_per_bin=max_segments_per_row)
    return [merge_rows([rows[i] for i in indices]) for indices in bins]


def make_collate_fn(model_config, *, max_length: int, loss_on: str = "last", image_mean, image_std, packing: bool = False,
                    min_bucket_length: int = 64, min_patches: int = 64, pad_id: int | None = None):
    """A pipeline collate_fn: rows (lists of examples) -> `make_batch` dict of numpy arrays.

    Unpacked rows are padded to the length bucket of the longest row; packed rows to max_length.
    Pixel patches are padded to a power-of-two bucket. Adds `num_examples` [B] per row."""
    from jaxrl_vl.models.inputs import make_batch

    buckets = length_buckets(max_length, min_bucket_length)

    def collate(rows: list[list[RenderedExample]]) -> dict:
        row_dicts = []
        for examples in rows:
            if examples:
                row = packed_row(examples, loss_on=loss_on, image_mean=image_mean, image_std=image_std)
            else:  # an all-padding row (only in a last, partial packed batch)
                row = {"input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.float32),
                       "segment_ids": np.zeros(0, np.int32)}
            row["num_examples"] = np.int32(len(examples))
            row_dicts.append(row)
        longest = max(len(r["input_ids"]) for r in row_dicts)
        length = max_length if packing else bucket_for(longest, buckets)
        num_patches = sum(int(e.image_grid_thw.prod(axis=1).sum()) for examples in rows for e in examples)
        return make_batch(row_dicts, model_config, pad_to_length=length, pad_patches_to=patch_bucket(num_patches, min_patches),
                          pad_id=pad_id)

    return collate
