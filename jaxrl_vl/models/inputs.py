"""Host-side batch collation for the Qwen-VL model (numpy in, numpy out; no jax).

make_batch turns a list of tokenized rows (with their images' normalized pixel patches) into the fixed-
shape arrays `models.apply` consumes:
  input_ids    int32 [B, L]      right-padded with the pad id
  segment_ids  int32 [B, L]      0 = padding, 1.. = packed example index (unpacked rows: 1 where real)
  position_ids int32 [3, B, L]   M-RoPE positions (models.rope.mrope_position_ids)
  pixel_values float32 [P, C*T*p*p], image_grid_thw int32 [N_img, 3], vision_* (models.vision_inputs)
  plus every per-token extra of the rows (e.g. loss_mask) padded with zeros to [B, L], and per-row scalars
  stacked to [B].
"""
from __future__ import annotations

import numpy as np

from jaxrl_vl.models.config import ModelConfig
from jaxrl_vl.models.rope import mrope_position_ids
from jaxrl_vl.models.vision_inputs import SlotShape, vision_inputs

_RESERVED = ("input_ids", "pixel_values", "image_grid_thw", "segment_ids")


def normalize_pixels(pixels_uint8: np.ndarray, mean, std) -> np.ndarray:
    """uint8 pixel patches laid out [P, C, T, p, p] (flattened or not) -> float32 (x/255 - mean)/std per channel."""
    x = np.asarray(pixels_uint8, np.float32) / 255.0
    shape = x.shape
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    x = x.reshape(shape[0], len(mean), -1)
    return ((x - mean[None, :, None]) / std[None, :, None]).reshape(shape)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_row(i: int, row: dict, config: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if "input_ids" not in row:
        raise ValueError(f"row {i}: missing 'input_ids'")
    ids = np.asarray(row["input_ids"]).reshape(-1)
    grid = row.get("image_grid_thw")
    grid = np.zeros((0, 3), np.int64) if grid is None else np.asarray(grid, np.int64).reshape(-1, 3)
    pixels = row.get("pixel_values")
    merge = config.vision.spatial_merge_size
    patches = int(np.prod(grid, axis=1).sum()) if len(grid) else 0
    image_tokens = int((ids == config.image_token_id).sum())
    if image_tokens != patches // (merge * merge):
        raise ValueError(f"row {i}: {image_tokens} image tokens (id {config.image_token_id}) but image_grid_thw "
                         f"{grid.tolist()} gives {patches // (merge * merge)} merged image tokens")
    if patches:
        if pixels is None:
            raise ValueError(f"row {i}: has image_grid_thw but no 'pixel_values'")
        if np.asarray(pixels).dtype == np.uint8:
            raise ValueError(f"row {i}: pixel_values are uint8; normalize them first with "
                             "models.inputs.normalize_pixels(pixels, image_mean, image_std)")
        pixels = np.asarray(pixels, np.float32)
        if pixels.ndim != 2 or pixels.shape != (patches, config.vision.patch_dim):
            raise ValueError(f"row {i}: pixel_values shape {pixels.shape} != (sum t*h*w={patches}, "
                             f"C*T*p*p={config.vision.patch_dim})")
    elif pixels is not None and np.size(pixels):
        raise ValueError(f"row {i}: pixel_values given without image_grid_thw")
    return ids, grid, (pixels if patches else None)


def make_batch(rows: list[dict], config: ModelConfig, pad_to_length: int | None = None,
               pad_patches_to: int | None = None, pad_id: int | None = None,
               vision_slots: SlotShape | None = None) -> dict[str, np.ndarray]:
    """Collate rows (see module doc) into one right-padded batch.

    pad_to_length: L (default: the longest row). pad_patches_to: P (default: total real patches, rounded
    up to a multiple of merge**2); with it set, pixel arrays are present even for text-only batches so
    jitted shapes stay fixed. pad_id: token used for padding (default config.pad_token_id, else 0).
    vision_slots: the vision tower's slot layout shape (default: bucketed from this batch's images);
    batches that will be stacked need one shared `vision_inputs.slot_shape(config.vision, *grids)`.
    """
    if not rows:
        raise ValueError("make_batch: rows is empty")
    checked = [_check_row(i, row, config) for i, row in enumerate(rows)]
    lengths = [len(ids) for ids, _, _ in checked]
    length = max(lengths) if pad_to_length is None else int(pad_to_length)
    if max(lengths) > length:
        raise ValueError(f"row {int(np.argmax(lengths))} has {max(lengths)} tokens > pad_to_length={length}")
    if pad_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    if pad_id == config.image_token_id:
        raise ValueError(f"pad_id={pad_id} equals image_token_id; choose another pad id")
    batch_size = len(rows)
    input_ids = np.full((batch_size, length), pad_id, np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    for b, (ids, _, _) in enumerate(checked):
        input_ids[b, :len(ids)] = ids
        given = rows[b].get("segment_ids")
        if given is not None:
            given = np.asarray(given, np.int32).reshape(-1)
            if given.shape != ids.shape or (given <= 0).any():
                raise ValueError(f"row {b}: segment_ids must be positive with the shape of input_ids {ids.shape}")
            segment_ids[b, :len(ids)] = given
        else:
            segment_ids[b, :len(ids)] = 1

    grid = np.concatenate([g for _, g, _ in checked], axis=0).astype(np.int32)
    out: dict[str, np.ndarray] = {"input_ids": input_ids, "segment_ids": segment_ids}
    out["position_ids"] = mrope_position_ids(input_ids, segment_ids, grid, config.image_token_id,
                                             config.vision.spatial_merge_size)
    unit = config.vision.spatial_merge_size ** 2
    real_patches = int(np.prod(grid, axis=1).sum()) if len(grid) else 0
    if pad_patches_to is not None:
        num_patches = _round_up(int(pad_patches_to), unit)
        if num_patches < real_patches:
            raise ValueError(f"pad_patches_to={pad_patches_to} < {real_patches} real patches in the batch")
    else:
        num_patches = _round_up(real_patches, unit)
    if num_patches:
        pixels = np.zeros((num_patches, config.vision.patch_dim), np.float32)
        pixel_list = [p for _, _, p in checked if p is not None]
        if pixel_list:
            pixels[:real_patches] = np.concatenate(pixel_list, axis=0)
        out["pixel_values"] = pixels
        out["image_grid_thw"] = grid
        out.update(vision_inputs(config.vision, grid, num_patches, vision_slots))
    out.update(_collate_extras(rows, lengths, length))
    return out


def _collate_extras(rows: list[dict], lengths: list[int], length: int) -> dict[str, np.ndarray]:
    keys = sorted({k for row in rows for k in row if k not in _RESERVED})
    out = {}
    for key in keys:
        missing = [b for b, row in enumerate(rows) if key not in row]
        if missing:
            raise ValueError(f"extra field {key!r} is missing in row {missing[0]} (every row needs it)")
        values = [np.asarray(row[key]) for row in rows]
        if all(v.ndim == 0 for v in values):
            out[key] = np.stack(values)
            continue
        for b, v in enumerate(values):
            if v.ndim == 0 or v.shape[0] != lengths[b]:
                raise ValueError(f"row {b}: extra field {key!r} has shape {v.shape}; per-token fields need "
                                 f"first dim {lengths[b]} (= len(input_ids)), per-row fields must be scalars")
        padded = np.zeros((len(rows), length) + values[0].shape[1:], values[0].dtype)
        for b, v in enumerate(values):
            padded[b, :len(v)] = v
        out[key] = padded
    return out
