"""Rendered examples -> stacked micro-batches for the jitted step (host side, numpy).

A pipeline batch is `batch_size` rows (lists of examples; one per row unless packing). For
gradient accumulation the rows are split into A = grad_accum_steps micro-batches that share one
padded length and one patch count, so they stack on a leading axis the step scans over:
  input_ids/segment_ids/loss_mask [A, B/A, L], position_ids [A, 3, B/A, L],
  pixel_values [A, P, D], vision_* [A, ...] (one shared vision slot layout),
  target_positions [A, B/A, T] when asked for (the positions the loss needs logits at, sft_step.target_positions)
plus host-only statistics `host_num_patches` / `host_num_images` (ints, for FLOPs) that the loop
removes before the batch goes to the device.
"""
from __future__ import annotations

import numpy as np

from jaxrl_vl.data import batching
from jaxrl_vl.models.inputs import make_batch
from jaxrl_vl.models.vision_inputs import slot_shape
from jaxrl_vl.train.sft_step import target_positions

HOST_STAT_KEYS = ("host_num_patches", "host_num_images")
_NOT_STACKED = ("image_grid_thw", "num_examples")


def _row(examples, *, loss_on, image_mean, image_std) -> dict:
    if not examples:  # an all-padding row (only in a last, partial packed batch)
        return {"input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.float32),
                "segment_ids": np.zeros(0, np.int32)}
    return batching.packed_row(examples, loss_on=loss_on, image_mean=image_mean, image_std=image_std)


def _num_patches(examples) -> int:
    return sum(int(e.image_grid_thw.prod(axis=1).sum()) for e in examples)


def _grid(group: list) -> np.ndarray:
    """image_grid_thw [n, 3] of every image of a micro-batch (a list of rows of examples)."""
    grids = [np.asarray(e.image_grid_thw).reshape(-1, 3) for examples in group for e in examples]
    return np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)


def make_stacked_collate(model_config, *, grad_accum_steps: int, max_length: int, loss_on: str,
                         image_mean, image_std, packing: bool, pad_id: int | None = None,
                         min_bucket_length: int = 64, min_patches: int = 64, num_slots_multiple: int = 1,
                         target_positions_multiple: int = 0):
    """-> collate(rows: list of batch_size lists of RenderedExample) -> dict of stacked arrays.
    num_slots_multiple: the devices that split the vision slot axis (data*fsdp; see slot_shape).
    target_positions_multiple: > 0 adds `target_positions`, their count rounded up to this multiple."""
    buckets = batching.length_buckets(max_length, min_bucket_length)

    def collate(rows: list[list]) -> dict:
        if len(rows) % grad_accum_steps:
            raise ValueError(f"{len(rows)} rows do not split into train.grad_accum_steps={grad_accum_steps} "
                             "equal micro-batches; make train.batch_size a multiple of it")
        per_micro = len(rows) // grad_accum_steps
        groups = [rows[i * per_micro:(i + 1) * per_micro] for i in range(grad_accum_steps)]
        row_dicts = [[_row(examples, loss_on=loss_on, image_mean=image_mean, image_std=image_std)
                      for examples in group] for group in groups]
        longest = max(len(r["input_ids"]) for group in row_dicts for r in group)
        length = max_length if packing else batching.bucket_for(longest, buckets)
        patches = [sum(_num_patches(examples) for examples in group) for group in groups]
        patch_count = batching.patch_bucket(max(patches), min_patches)
        slots = slot_shape(model_config.vision, *[_grid(group) for group in groups],
                           num_slots_multiple=num_slots_multiple)
        micro_batches = [make_batch(group, model_config, pad_to_length=length, pad_patches_to=patch_count,
                                    pad_id=pad_id, vision_slots=slots) for group in row_dicts]
        stacked = {key: np.stack([b[key] for b in micro_batches]) for key in micro_batches[0]
                   if key not in _NOT_STACKED}
        if target_positions_multiple > 0:
            stacked["target_positions"] = target_positions(stacked["loss_mask"], target_positions_multiple)
        stacked["host_num_patches"] = int(sum(patches))
        stacked["host_num_images"] = int(sum(len(e.image_grid_thw) for examples in rows for e in examples))
        return stacked

    return collate


def split_host_stats(batch: dict) -> tuple[dict, dict]:
    """-> (device arrays, host statistics)."""
    device = {k: v for k, v in batch.items() if k not in HOST_STAT_KEYS}
    return device, {k: batch[k] for k in HOST_STAT_KEYS if k in batch}
