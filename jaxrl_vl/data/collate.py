"""Rows -> stacked micro-batches for the jitted step: the one home of host-side collation (numpy).

SFT (`sft_collate_fn`, a grain pipeline's collate) and RL (`rl_micro_batches`, training rows of trajectories)
both produce a dict of arrays with a leading micro-batch axis A that the step scans over:
  input_ids / segment_ids / loss_mask (and RL's per-token arrays) [A, B, L], position_ids [A, 3, B, L],
  pixel_values [A, S, P_s, D] and the vision_* arrays [A, S, ...] (S batch shards of B/S rows, each with its own
  pixels and shard-local vision indices; models/inputs.make_batch),
  target_positions [A, B, T] when asked for (losses/target_positions.py),
plus host-only statistics `host_num_patches` / `host_num_images` (ints, for FLOPs; `split_host_stats`).
The A micro-batches share one padded length, per-shard patch count and slot layout so they stack. Lengths come
from few buckets (few compiled shapes). `agree(needs) -> needs` (a dict of ints, its per-key max over every
process: train/distributed.agree_max; the identity on one process) lets several processes settle on the padded
shapes before padding, each collating only its own rows and shards.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from jaxrl_vl.data import batching
from jaxrl_vl.losses.target_positions import positions_size, target_positions
from jaxrl_vl.models.inputs import make_batch, shard_grids
from jaxrl_vl.models.vision_inputs import agree_shapes

HOST_STAT_KEYS = ("host_num_patches", "host_num_images")
_NOT_STACKED = ("image_grid_thw", "num_examples")


def _no_agreement(needs: dict) -> dict:
    return needs


def split_host_stats(batch: dict) -> tuple[dict, dict]:
    """-> (device arrays, host statistics)."""
    device = {k: v for k, v in batch.items() if k not in HOST_STAT_KEYS}
    return device, {k: batch[k] for k in HOST_STAT_KEYS if k in batch}


def _round_up(value: int, multiple: int) -> int:
    return -(-max(int(value), 1) // multiple) * multiple


def _grid(rows: list[dict]) -> np.ndarray:
    """image_grid_thw [n, 3] of every image of a micro-batch's rows."""
    grids = [np.asarray(r["image_grid_thw"]).reshape(-1, 3) for r in rows if "image_grid_thw" in r]
    return np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)


def _patches(rows: list[dict]) -> int:
    return int(sum(np.prod(r["image_grid_thw"], axis=1).sum() for r in rows if "image_grid_thw" in r))


def vision_shapes(model_config, groups: list[list[dict]], num_shards: int, agree):
    """The per-shard patch count and slot layout that fit every shard of every micro-batch of every process."""
    grids = [g for group in groups for g in shard_grids(group, num_shards)]

    def reduce_max(vector: np.ndarray) -> np.ndarray:
        agreed = agree({str(i): int(x) for i, x in enumerate(vector)})
        return np.asarray([agreed[str(i)] for i in range(len(vector))], np.int32)

    return agree_shapes(model_config.vision, grids, reduce_max=reduce_max)


def stack_micro_batches(groups: list[list[dict]], model_config, *, length: int, patches: int | None, slots,
                        pad_id: int | None, positions_multiple: int, positions: int | None,
                        num_shards: int = 1) -> dict:
    """A equal-size groups of rows -> one dict of arrays [A, ...] (see module doc)."""
    micro = [make_batch(g, model_config, pad_to_length=length, pad_patches_to=patches, pad_id=pad_id,
                        vision_slots=slots, num_shards=num_shards) for g in groups]
    stacked = {k: np.stack([b[k] for b in micro]) for k in micro[0] if k not in _NOT_STACKED}
    if positions_multiple > 0:
        stacked["target_positions"] = target_positions(stacked["loss_mask"], positions_multiple, positions)
    stacked["host_num_patches"] = int(sum(_patches(g) for g in groups))
    stacked["host_num_images"] = int(sum(len(_grid(g)) for g in groups))
    return stacked


def _target_count(groups: list[list[dict]]) -> int:
    return int(max((np.count_nonzero(np.asarray(r["loss_mask"])[1:]) for g in groups for r in g), default=0))


def sft_collate_fn(model_config, *, grad_accum_steps: int, max_length: int, loss_on: str, image_mean, image_std,
                   packing: bool, pad_id: int | None = None, min_bucket_length: int = 64, min_patches: int = 64,
                   num_shards: int = 1, target_positions_multiple: int = 0,
                   agree: Callable[[dict], dict] = _no_agreement):
    """-> collate(rows: list of this process's lists of RenderedExample) -> dict of stacked arrays.
    num_shards: this process's batch shards (its share of the mesh's data*fsdp; each micro-batch's rows divide
    into them). target_positions_multiple: > 0 adds `target_positions`, their count rounded up to this multiple."""
    buckets = batching.length_buckets(max_length, min_bucket_length)

    def row(examples) -> dict:
        if not examples:  # an all-padding row (only in a last, partial packed batch)
            return {"input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.float32),
                    "segment_ids": np.zeros(0, np.int32)}
        return batching.packed_row(examples, loss_on=loss_on, image_mean=image_mean, image_std=image_std)

    def collate(rows: list[list]) -> dict:
        if len(rows) % grad_accum_steps:
            raise ValueError(f"{len(rows)} rows do not split into train.grad_accum_steps={grad_accum_steps} "
                             "equal micro-batches; make train.batch_size a multiple of it")
        per_micro = len(rows) // grad_accum_steps
        groups = [[row(examples) for examples in rows[i * per_micro:(i + 1) * per_micro]]
                  for i in range(grad_accum_steps)]
        longest = max(len(r["input_ids"]) for g in groups for r in g)
        needs = agree({"length": max_length if packing else batching.bucket_for(longest, buckets),
                       "targets": _target_count(groups)})
        shapes = vision_shapes(model_config, groups, num_shards, agree)
        positions = positions_size(needs["targets"], needs["length"], max(target_positions_multiple, 1))
        return stack_micro_batches(groups, model_config, length=needs["length"],
                                   patches=batching.patch_bucket(shapes.num_patches, min_patches), slots=shapes.slots,
                                   pad_id=pad_id, positions_multiple=target_positions_multiple, positions=positions,
                                   num_shards=num_shards)

    return collate


def _filler_row(template: dict, pad_id: int) -> dict:
    """A row that trains nothing (one pad token, loss_mask 0), shaped like `template`'s fields."""
    row = {"input_ids": np.asarray([pad_id], np.int32)}
    for key, value in template.items():
        if key in ("input_ids", "pixel_values", "image_grid_thw"):
            continue
        value = np.asarray(value)
        if value.ndim == 0:
            row[key] = np.zeros((), value.dtype)
        else:  # turn -1 and segment 1 (make_batch wants positive segment ids on real tokens)
            row[key] = np.full((1,), {"turn_ids": -1, "segment_ids": 1}.get(key, 0), value.dtype)
    return row


def rl_micro_batches(rows: list[dict], model_config, *, num_micro_batches: int, length_multiple: int = 128,
                     patch_multiple: int = 64, rows_multiple: int = 1, target_positions_multiple: int = 0,
                     num_shards: int = 1, agree: Callable[[dict], dict] = _no_agreement) -> dict[str, np.ndarray]:
    """Training rows (trajectory.training_rows) -> one dict of arrays stacked on a leading micro-batch axis
    A = num_micro_batches. Rows are dealt round-robin over the A micro-batches (micro-batch i holds a real row
    whenever i < len(rows), which PPO mini-batches rely on) and each is padded with non-training filler rows to
    B, rounded up to `rows_multiple` (a multiple of num_shards, this process's batch shards); L and the per-shard
    patch count P_s are rounded up to their multiples so jit sees few shapes."""
    if not rows:
        raise ValueError("rl_micro_batches: no rows (every group filtered out?)")
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
    pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else 0
    if rows_multiple % num_shards:
        raise ValueError(f"rows_multiple={rows_multiple} must be a multiple of num_shards={num_shards}")
    merge = model_config.vision.spatial_merge_size ** 2
    groups = [list(rows[i::num_micro_batches]) for i in range(num_micro_batches)]
    needs = agree({"rows": _round_up(max(len(g) for g in groups), rows_multiple),
                   "length": _round_up(max(len(r["input_ids"]) for r in rows), length_multiple),
                   "targets": _target_count(groups)})
    filler = _filler_row(rows[0], pad_id)
    groups = [g + [filler] * (needs["rows"] - len(g)) for g in groups]
    shapes = vision_shapes(model_config, groups, num_shards, agree)
    patches = _round_up(shapes.num_patches, max(patch_multiple, merge)) if shapes.num_patches else None
    positions = positions_size(needs["targets"], needs["length"], max(target_positions_multiple, 1))
    return stack_micro_batches(groups, model_config, length=needs["length"], patches=patches, slots=shapes.slots,
                               pad_id=pad_id, positions_multiple=target_positions_multiple, positions=positions,
                               num_shards=num_shards)
