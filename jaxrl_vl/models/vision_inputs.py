"""Host-side (numpy) metadata for the Qwen-VL vision towers, computed from `grid_thw`.

Everything data-dependent about the vision tower (which patches belong to which image, rotary
positions, position-embedding interpolation taps, Qwen2.5-VL window ordering) is computed here once
per batch, so the jitted tower sees only fixed-shape arrays of length `num_patches_padded` (P).

Patch order is the processor's: per image, per frame, patches are laid out block-major over the
spatial-merge blocks (block_row, block_col, in_row, in_col), so each run of merge**2 consecutive
patches forms one merged (LLM) token. Padding patches sit after all real patches.

Keys (all prefixed `vision_` so they can be merged into the model batch dict):
  vision_segment_ids   int32 [P]      attention segment per patch: 1.. one per frame of each image
                                      (transformers' cu_seqlens splits per frame), 0 = padding.
  vision_position_ids  int32 [P, 2]   rotary (row, col) of each patch within its frame.
  qwen3_vl:
  vision_interp_indices int32 [P, 4]  bilinear taps into the flattened learned pos-embed grid.
  vision_interp_weights float32 [P, 4] their weights (0 for padding).
  qwen2_5_vl:
  vision_window_order        int32 [P]        windowed position -> original patch index.
  vision_window_segment_ids  int32 [P]        window id (1..) of each windowed position, 0 = padding.
  vision_merged_inverse_order int32 [P//m^2]  original merged token -> its windowed position
                                              (argsort of the merged-level window order).
"""
from __future__ import annotations

import numpy as np

ARCHS = ("qwen3_vl", "qwen2_5_vl")


def vision_arch(vision_config) -> str:
    """'qwen3_vl' or 'qwen2_5_vl' from an explicit `arch`, the HF `model_type`, or the fields present."""
    arch = getattr(vision_config, "arch", None)
    if arch in ARCHS:
        return arch
    model_type = str(getattr(vision_config, "model_type", "") or "")
    if model_type.startswith("qwen3_vl"):
        return "qwen3_vl"
    if model_type.startswith("qwen2_5_vl"):
        return "qwen2_5_vl"
    if getattr(vision_config, "deepstack_visual_indexes", None) is not None:
        return "qwen3_vl"
    if getattr(vision_config, "fullatt_block_indexes", None) is not None:
        return "qwen2_5_vl"
    raise ValueError(
        "cannot tell the vision architecture: give vision_config an `arch` in "
        f"{ARCHS} (or HF model_type), got arch={arch!r} model_type={model_type!r}"
    )


def _check_grid(vision_config, grid_thw: np.ndarray, num_patches_padded: int) -> np.ndarray:
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    merge = int(vision_config.spatial_merge_size)
    if (grid_thw <= 0).any():
        raise ValueError(f"image_grid_thw must be positive, got {grid_thw.tolist()}")
    if (grid_thw[:, 1:] % merge).any():
        raise ValueError(
            f"image_grid_thw h and w must be multiples of spatial_merge_size={merge}, got {grid_thw.tolist()}"
        )
    total = int(np.prod(grid_thw, axis=1).sum())
    if num_patches_padded < total:
        raise ValueError(
            f"num_patches_padded={num_patches_padded} < {total} real patches in image_grid_thw; "
            "pad pixel_values to at least the real patch count"
        )
    if num_patches_padded % (merge * merge):
        raise ValueError(
            f"num_patches_padded={num_patches_padded} must be a multiple of spatial_merge_size**2={merge * merge}"
        )
    return grid_thw


def _patch_rows_cols(grid_thw: np.ndarray, merge: int) -> tuple[np.ndarray, ...]:
    """Per real patch: (row, col, frame segment 1.., frame height, frame width), block-major order."""
    counts = np.prod(grid_thw, axis=1)
    heights = np.repeat(grid_thw[:, 1], counts)
    widths = np.repeat(grid_thw[:, 2], counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    offset_in_image = np.arange(int(counts.sum())) - starts
    frame_size = heights * widths
    within = offset_in_image % frame_size
    blocks_w = widths // merge
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    # One attention segment per frame of each image, numbered globally from 1.
    frames_before = np.repeat(np.cumsum(grid_thw[:, 0]) - grid_thw[:, 0], counts)
    segment = frames_before + offset_in_image // frame_size + 1
    return block_row * merge + in_row, block_col * merge + in_col, segment, heights, widths


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Align-corners bilinear taps [n, 2] and weights [n, 2] into a `side`-long axis (fp32 like torch)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.clip(np.float32(1) - distance, 0, None).astype(np.float32)
    return taps, weights


def _window_order(grid_thw: np.ndarray, vision_config) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL merged-token window order and the window id (from 1) of each ordered merged token.

    Windows are `window_size // merge // patch` merged tokens on a side, tiled from the top-left of
    each frame; tokens are ordered (image, frame, window row, window col, row in window, col in window),
    which is transformers' get_vision_window_index without the -100 padding trick.
    """
    merge = int(vision_config.spatial_merge_size)
    side = int(vision_config.window_size) // merge // int(vision_config.patch_size)
    if side < 1:
        raise ValueError(
            f"window_size={vision_config.window_size} must be >= spatial_merge_size*patch_size="
            f"{merge * int(vision_config.patch_size)}"
        )
    merged_counts = grid_thw[:, 0] * (grid_thw[:, 1] // merge) * (grid_thw[:, 2] // merge)
    image = np.repeat(np.arange(len(grid_thw)), merged_counts)
    llm_h = np.repeat(grid_thw[:, 1] // merge, merged_counts)
    llm_w = np.repeat(grid_thw[:, 2] // merge, merged_counts)
    local = np.arange(int(merged_counts.sum())) - np.repeat(np.cumsum(merged_counts) - merged_counts, merged_counts)
    frame, rest = np.divmod(local, llm_h * llm_w)
    row, col = np.divmod(rest, llm_w)
    # np.lexsort sorts by the last key first.
    order = np.lexsort((col % side, row % side, col // side, row // side, frame, image))
    window_key = np.stack([image, frame, row // side, col // side], axis=1)[order]
    new_window = np.ones(len(order), dtype=bool)
    new_window[1:] = (window_key[1:] != window_key[:-1]).any(axis=1)
    return order, np.cumsum(new_window)


def vision_inputs(vision_config, grid_thw: np.ndarray, num_patches_padded: int) -> dict[str, np.ndarray]:
    """Vision-tower metadata for the images in `grid_thw` [N, 3] (t, h, w in patches), padded to
    `num_patches_padded` patches. Returns the `vision_*` arrays described in the module docstring."""
    arch = vision_arch(vision_config)
    num_patches_padded = int(num_patches_padded)
    grid_thw = _check_grid(vision_config, grid_thw, num_patches_padded)
    merge = int(vision_config.spatial_merge_size)
    rows, cols, segment, heights, widths = _patch_rows_cols(grid_thw, merge)
    num_real = len(rows)
    pad = num_patches_padded - num_real

    out = {
        "vision_segment_ids": np.pad(segment, (0, pad)).astype(np.int32),
        "vision_position_ids": np.pad(np.stack([rows, cols], axis=1), ((0, pad), (0, 0))).astype(np.int32),
    }
    if arch == "qwen3_vl":
        side = int(round(int(vision_config.num_position_embeddings) ** 0.5))
        if side * side != int(vision_config.num_position_embeddings):
            raise ValueError(
                f"num_position_embeddings={vision_config.num_position_embeddings} must be a perfect square"
            )
        h_taps, h_weights = _bilinear_taps(rows, heights, side)
        w_taps, w_weights = _bilinear_taps(cols, widths, side)
        indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        out["vision_interp_indices"] = np.pad(indices, ((0, pad), (0, 0))).astype(np.int32)
        out["vision_interp_weights"] = np.pad(weights, ((0, pad), (0, 0))).astype(np.float32)
    else:
        unit = merge * merge
        merged_order, merged_window = _window_order(grid_thw, vision_config)
        num_merged_padded = num_patches_padded // unit
        # Padding merged tokens keep their places after all real ones.
        merged_order = np.concatenate([merged_order, np.arange(len(merged_order), num_merged_padded)])
        patch_order = (merged_order[:, None] * unit + np.arange(unit)).reshape(-1)
        window_ids = np.pad(np.repeat(merged_window, unit), (0, pad))
        out["vision_window_order"] = patch_order.astype(np.int32)
        out["vision_window_segment_ids"] = window_ids.astype(np.int32)
        out["vision_merged_inverse_order"] = np.argsort(merged_order).astype(np.int32)
    return out
