"""Host-side batch collation for the Qwen-VL model (numpy in, numpy out; no jax).

make_batch turns a list of tokenized rows (with their images' normalized pixel patches) into the fixed-
shape arrays `models.apply` consumes:
  input_ids    int32 [B, L]      right-padded with the pad id
  segment_ids  int32 [B, L]      0 = padding, 1.. = packed example index (unpacked rows: 1 where real)
  position_ids int32 [3, B, L]   M-RoPE positions (models.rope.mrope_position_ids)
  pixel_values float32 [S, P_s, C*T*p*p] and vision_* [S, ...] (models.vision_inputs), per batch shard
  image_grid_thw int32 [N_img, 3]  every image of the batch in row order (host side: rope, reference models)
  plus every per-token extra of the rows (e.g. loss_mask) padded with zeros to [B, L], and per-row scalars
  stacked to [B].

Batch shards (num_shards=S): rows b*B/S .. (b+1)*B/S - 1 form shard b, and each shard carries only its own
rows' images: its pixel rows (real ones first, then zeros up to P_s) and its vision_* metadata with indices
local to the shard, every shard padded to one P_s and one SlotShape. The model runs the vision tower per
shard and places a shard's image embeddings only in that shard's rows, so with S = the mesh's data*fsdp
(sharding.batch_shardings splits the shard axis over it) no pixel or image embedding crosses devices, and a
host needs only its own rows' images. S = 1 (the default) is one shard holding every image.

Multi-host (each process collates only its own shards): agree the shapes first, then pad to them:
  grids = shard_grids(local_rows, local_shards)
  shapes = vision_inputs.agree_shapes(config.vision, grids, reduce_max=<elementwise max over processes>)
  make_batch(local_rows, config, pad_to_length=<agreed L>, pad_patches_to=shapes.num_patches,
             vision_slots=shapes.slots, num_shards=local_shards)
"""
from __future__ import annotations

import numpy as np

from jaxrl_vl.models.config import ModelConfig
from jaxrl_vl.models.rope import mrope_position_ids
from jaxrl_vl.models.vision_inputs import SlotShape, agree_shapes, vision_inputs

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
    grid = _row_grid(row)
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


def split_shards(rows: list, num_shards: int) -> list[list]:
    """rows -> num_shards contiguous groups of len(rows) // num_shards rows (the batch shards)."""
    num_shards = int(num_shards)
    if num_shards < 1 or len(rows) % num_shards:
        raise ValueError(f"num_shards={num_shards} must be >= 1 and divide the {len(rows)} rows; pad the batch "
                         f"to a multiple of {max(num_shards, 1)} rows (padding rows have no tokens)")
    size = len(rows) // num_shards
    return [rows[s * size:(s + 1) * size] for s in range(num_shards)]


def _row_grid(row: dict) -> np.ndarray:
    grid = row.get("image_grid_thw")
    return np.zeros((0, 3), np.int64) if grid is None else np.asarray(grid, np.int64).reshape(-1, 3)


def _concat_grids(grids) -> np.ndarray:
    return np.concatenate(list(grids) + [np.zeros((0, 3), np.int64)])


def shard_grids(rows: list[dict], num_shards: int = 1) -> list[np.ndarray]:
    """image_grid_thw [n, 3] of each batch shard's images (rows in order), what vision_inputs.agree_shapes takes."""
    return [_concat_grids(_row_grid(row) for row in shard) for shard in split_shards(rows, num_shards)]


def make_batch(rows: list[dict], config: ModelConfig, pad_to_length: int | None = None,
               pad_patches_to: int | None = None, pad_id: int | None = None,
               vision_slots: SlotShape | None = None, num_shards: int = 1) -> dict[str, np.ndarray]:
    """Collate rows (see module doc) into one right-padded batch of `num_shards` batch shards.

    pad_to_length: L (default: the longest row). pad_patches_to: P_s, pixel rows per shard (default: the most
    real patches of any shard, rounded up to a multiple of merge**2); with it set, pixel arrays are present even
    for text-only batches so jitted shapes stay fixed. pad_id: token used for padding (default
    config.pad_token_id, else 0). vision_slots: every shard's slot layout shape (default: from this batch's
    shards, `vision_inputs.agree_shapes`); batches that will be stacked, or shards collated by different
    processes, need one shared shape (agree_shapes over all of their shards)."""
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
    input_ids, segment_ids = _tokens(rows, checked, length, pad_id)
    grid = _concat_grids(g for _, g, _ in checked).astype(np.int32)
    out: dict[str, np.ndarray] = {"input_ids": input_ids, "segment_ids": segment_ids}
    out["position_ids"] = mrope_position_ids(input_ids, segment_ids, grid, config.image_token_id,
                                             config.vision.spatial_merge_size)
    out.update(_vision_shards(split_shards(checked, num_shards), config, pad_patches_to, vision_slots))
    if "pixel_values" in out:
        out["image_grid_thw"] = grid
    out.update(_collate_extras(rows, lengths, length))
    return out


def _tokens(rows: list[dict], checked: list, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and segment_ids [B, L], right-padded."""
    input_ids = np.full((len(rows), length), pad_id, np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
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
    return input_ids, segment_ids


def _vision_shards(shards: list[list], config: ModelConfig, pad_patches_to: int | None,
                   vision_slots: SlotShape | None) -> dict[str, np.ndarray]:
    """pixel_values [S, P_s, D] and the vision_* arrays [S, ...] of each shard's (checked) rows; {} when the
    batch has no patches and no pad_patches_to."""
    grids = [_concat_grids(g for _, g, _ in shard) for shard in shards]
    shapes = agree_shapes(config.vision, grids)
    unit = config.vision.spatial_merge_size ** 2
    num_patches = shapes.num_patches if pad_patches_to is None else _round_up(int(pad_patches_to), unit)
    if num_patches < shapes.num_patches:
        real = [int(np.prod(g, axis=1).sum()) for g in grids]
        raise ValueError(f"pad_patches_to={pad_patches_to} < {max(real)} real patches in batch shard "
                         f"{int(np.argmax(real))}; pass at least the most patches of any shard (agree_shapes)")
    if not num_patches:
        return {}
    slots = shapes.slots if vision_slots is None else vision_slots
    pixels = np.zeros((len(shards), num_patches, config.vision.patch_dim), np.float32)
    per_shard = []
    for s, (shard, grid) in enumerate(zip(shards, grids)):
        pixel_list = [p for _, _, p in shard if p is not None]
        if pixel_list:
            real = np.concatenate(pixel_list, axis=0)
            pixels[s, :len(real)] = real
        per_shard.append(vision_inputs(config.vision, grid, num_patches, slots))
    return {"pixel_values": pixels, **{k: np.stack([v[k] for v in per_shard]) for k in per_shard[0]}}


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
