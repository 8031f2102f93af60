"""Host-side (numpy) metadata for the Qwen-VL vision towers, computed from `grid_thw`.

Everything data-dependent about the vision tower (which patches belong to which frame, rotary
positions, position-embedding interpolation taps, Qwen2.5-VL windows) is computed here once per
batch, so the jitted tower sees only fixed-shape arrays.

Patch order of `pixel_values` is the processor's: per image, per frame, patches are laid out
block-major over the spatial-merge blocks (block_row, block_col, in_row, in_col), so each run of
merge**2 consecutive patches forms one merged (LLM) token. Padding patches sit after all real ones.

Slot layout. Attention never crosses a frame, so the tower runs on a [num_slots, slot_len] grid
(`SlotShape`) and attention is one batched call over slots (cost num_slots * slot_len^2 instead of
num_patches^2 for one masked attention over every patch); the slot axis can be split over devices
with every op local. Each frame (images in order, frames in order) fills a contiguous run of one
slot; the rest of the slot is padding. `slot_shape` picks the layout:
  - every frame the same size (Maze, fixed-size benchmarks): one frame per slot, slot_len = that
    size rounded up by `frame_slot_len` (<= 1/32 padding from 256 patches up: a 448x448 image's 784
    patches stay 784, where `bucket_size`'s 8 per octave made 832 and cost 1% of a 2B H100 step). Attention
    needs only a key length per slot (`vision_slot_lengths`, mask-free: cuDNN flash attention on GPU).
  - mixed sizes: slot_len = the largest frame rounded up to a power of two (few distinct shapes),
    and frames are packed largest first into the first slot with room (first-fit decreasing), so
    small frames share slots instead of each padding a slot to the largest frame. A slot holding
    several frames needs a segment mask (`vision_slot_segments`, `packed=True`).
num_slots is bucketed (4 per octave, < 25% empty slots) and can be rounded up to a multiple of the
devices that split one shard's slots. Over 300 simulated batches of 8 rows with 1-3 random-size images each, this
layout has a median 1.12x (max 1.35x) slot positions per real patch in 12 distinct shapes (Qwen3-VL
and Qwen2.5-VL alike), where one frame per slot sized for the largest frame had 2.96x (max 4.8x) in
22 (tests/test_models_vision.py::test_mixed_sizes_pack_with_bounded_padding).

Batch shards. A model batch's B rows form S contiguous shards of B/S rows (models.inputs.make_batch,
num_shards=S; S = the mesh's data*fsdp or a multiple of it), and each shard carries its own images: its
own pixel_values rows and the arrays below, every index local to the shard. `vision_inputs` builds one
shard; make_batch stacks the S shards on a leading axis (pixel_values [S, P_s, D], vision_slot_patches
[S, N_s, L_s], ...), each padded to the shapes all shards share, so the shard axis splits over devices and
no image crosses a shard. `agree_shapes` finds those shared shapes (P_s and a SlotShape) from every
shard's image_grid_thw, across processes too (a max over processes of two short vectors).

Keys of one shard (all prefixed `vision_` so they can be merged into the model batch dict; `vision_slot_*`
arrays have the slot axis first; a model batch puts the shard axis before it):
  vision_slot_patches    int32 [N, L]     pixel_values row of each slot position; P (= num_patches_padded,
                                          out of range) for padding positions.
  vision_slot_lengths    int32 [N]        unpacked layout only: real patches per slot (empty slots: 1, a
                                          zero padding patch, so no attention row is fully masked).
  vision_slot_segments   int32 [N, L]     packed layout only: frame index + 1 of each position, 0 for
                                          padding (padding attends to padding, so no row is fully masked).
  vision_slot_positions  int32 [N, L, 2]  rotary (row, col) of each patch within its frame.
  vision_merged_rows     int32 [P//m^2]   per merged token in processor order: its row in the tower's
                                          merged output [N*L//m^2]; N*L//m^2 (out of range) for padding.
  qwen3_vl:
  vision_slot_interp_indices int32 [N, L, 4]    bilinear taps into the flattened learned pos-embed grid.
  vision_slot_interp_weights float32 [N, L, 4]  their weights (0 for padding).
  qwen2_5_vl (windowed layers attend within windows of `window_size` pixels, W windows per slot of
  Lw = (window_size // patch_size)**2 patches; windows never cross frames, so they need no segments.
  Packed slots take at most W = twice the windows that tile slot_len, so W adds no shapes):
  vision_slot_window_index   int32 [N, W, Lw] slot position of each window position; L for padding.
  vision_slot_window_lengths int32 [N, W]     real patches per window (1 for empty windows).
  vision_slot_window_inverse int32 [N, L]     window position (w*Lw + i) of each slot position; W*Lw
                                              for padding.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

ARCHS = ("qwen3_vl", "qwen2_5_vl")


class SlotShape(NamedTuple):
    """Static shape of the vision slot layout (see the module docstring)."""
    num_slots: int
    slot_len: int
    windows_per_slot: int = 0  # qwen2_5_vl only
    packed: bool = False  # several frames share a slot: attention takes a segment mask


def bucket_size(n: int, per_octave: int = 8) -> int:
    """n rounded up to a multiple of 2**floor(log2 n) // per_octave (at least 1): at most
    1/per_octave padding, `per_octave` sizes per octave."""
    n = max(int(n), 1)
    step = max(1, (1 << (n.bit_length() - 1)) // per_octave)
    return -(-n // step) * step


def frame_slot_len(n: int) -> int:
    """Slot length for frames of n patches: n rounded up in steps of 2**floor(log2 n) // 32, but at least
    min(8, 2**floor(log2 n) // 8): at most 1/32 padding for large frames, multiples of 8 from 64 patches up
    (aligned matmul rows), and below 128 patches the same sizes as bucket_size(n)."""
    n = max(int(n), 1)
    octave = 1 << (n.bit_length() - 1)
    step = max(1, octave // 32, min(8, octave // 8))
    return -(-n // step) * step


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


def _window_side(vision_config) -> int:
    merge = int(vision_config.spatial_merge_size)
    side = int(vision_config.window_size) // merge // int(vision_config.patch_size)
    if side < 1:
        raise ValueError(
            f"window_size={vision_config.window_size} must be >= spatial_merge_size*patch_size="
            f"{merge * int(vision_config.patch_size)}"
        )
    return side


def _windows_per_frame(grid_thw: np.ndarray, vision_config) -> np.ndarray:
    merge, side = int(vision_config.spatial_merge_size), _window_side(vision_config)
    return -(-(grid_thw[:, 1] // merge) // side) * -(-(grid_thw[:, 2] // merge) // side)


def _frames(vision_config, grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame (images in order, frames in order): its patches, and its windows (qwen2_5_vl; else 0)."""
    repeat = lambda per_image: np.repeat(per_image, grid_thw[:, 0]).astype(np.int64)
    windows = _windows_per_frame(grid_thw, vision_config) if vision_arch(vision_config) == "qwen2_5_vl" else 0
    return repeat(grid_thw[:, 1] * grid_thw[:, 2]), repeat(np.broadcast_to(windows, len(grid_thw)))


def _pack(sizes: np.ndarray, windows: np.ndarray, slot_len: int, windows_per_slot: int) -> tuple[np.ndarray, ...]:
    """First-fit decreasing: frames largest first (ties in order), each into the first slot with room
    for its patches and windows. -> per frame: its slot, its first position and its first window in the
    slot; windows used per slot."""
    slot, offset, window_offset = (np.zeros(len(sizes), np.int64) for _ in range(3))
    used, used_windows = np.zeros(len(sizes), np.int64), np.zeros(len(sizes), np.int64)
    num_slots = 0
    for f in np.argsort(-sizes, kind="stable"):
        room = np.flatnonzero((used[:num_slots] + sizes[f] <= slot_len)
                              & (used_windows[:num_slots] + windows[f] <= windows_per_slot))
        s = int(room[0]) if len(room) else num_slots
        num_slots = max(num_slots, s + 1)
        slot[f], offset[f], window_offset[f] = s, used[s], used_windows[s]
        used[s] += sizes[f]
        used_windows[s] += windows[f]
    return slot, offset, window_offset, used_windows[:num_slots]


class VisionShapes(NamedTuple):
    """What every batch shard is padded to (make_batch's pad_patches_to and vision_slots)."""
    num_patches: int  # pixel rows per shard (P_s), a multiple of spatial_merge_size**2
    slots: SlotShape


_NO_FRAME = -(2 ** 31 - 1)  # the negated shortest frame of a shard without frames: below every real one


def _local_max(vectors: list[np.ndarray]) -> np.ndarray:
    return np.max(np.stack(vectors), axis=0)


def _slot_dims(vision_config, longest: int, shortest: int, most_windows: int) -> tuple[int, int]:
    """(slot_len, windows_per_slot) for frames of `shortest`..`longest` patches (of up to `most_windows`
    windows; 0 frames: longest = 0): see the module docstring."""
    merge = int(vision_config.spatial_merge_size)
    longest, most_windows = max(longest, merge * merge), max(most_windows, 1)
    is_windowed = vision_arch(vision_config) == "qwen2_5_vl"
    if shortest >= longest:  # one frame size (or none): a tight slot_len, so one frame per slot
        return frame_slot_len(longest), (bucket_size(most_windows, 4) if is_windowed else 0)
    # mixed sizes: a power-of-two slot_len (few distinct shapes); small frames share slots. Qwen2.5-VL: a slot
    # takes up to twice the windows that tile it (small frames bring partial windows), so windows_per_slot
    # follows slot_len and adds no shapes of its own.
    slot_len = 1 << (longest - 1).bit_length()
    if not is_windowed:
        return slot_len, 0
    tiling = 2 * slot_len // (_window_side(vision_config) * merge) ** 2
    return slot_len, 1 << (max(tiling, most_windows) - 1).bit_length()


def agree_shapes(vision_config, shard_grids, *, reduce_max=None) -> VisionShapes:
    """The patch count and slot layout that fit every shard of `shard_grids` (one image_grid_thw [n, 3] per
    batch shard, e.g. models.inputs.shard_grids; pass every micro-batch's shards when they will be stacked).

    reduce_max: int32 vector -> its elementwise max over every process (default: this process's shards only).
    Multi-host, `lambda v: np.max(jax.experimental.multihost_utils.process_allgather(v), axis=0)`: it is called
    twice, on vectors of fixed length, so every process gets the same shapes as one process holding all shards
    would. num_patches is the most real patches of any shard, rounded up to spatial_merge_size**2 (bucket it
    further, the same way on every process, if you like)."""
    reduce_max = reduce_max or (lambda v: v)
    frames = [_frames(vision_config, np.asarray(g, np.int64).reshape(-1, 3)) for g in shard_grids]
    if not frames:
        raise ValueError("agree_shapes: shard_grids is empty; give one image_grid_thw [n, 3] per batch shard")
    needs = [np.array([int(s.sum()), int(s.max(initial=0)), -int(s.min()) if len(s) else _NO_FRAME,
                       int(w.max(initial=0))], np.int32) for s, w in frames]
    patches, longest, negated_shortest, most_windows = (int(x) for x in reduce_max(_local_max(needs)))
    slot_len, windows_per_slot = _slot_dims(vision_config, longest, -negated_shortest, most_windows)
    used = []
    for sizes, windows in frames:
        *_, slot_windows = _pack(sizes, windows, slot_len, windows_per_slot)
        used.append(np.array([len(slot_windows), len(slot_windows) < len(sizes)], np.int32))
    num_slots, packed = (int(x) for x in reduce_max(_local_max(used)))
    unit = int(vision_config.spatial_merge_size) ** 2
    slots = SlotShape(bucket_size(max(num_slots, 1), 4), slot_len, windows_per_slot, bool(packed))
    return VisionShapes(-(-patches // unit) * unit, slots)


def slot_shape(vision_config, *grids_thw: np.ndarray) -> SlotShape:
    """The SlotShape that fits each of `grids_thw` (one [n, 3] grid per batch shard; pass all the shards and
    micro-batches that will be stacked together so they share one shape)."""
    return agree_shapes(vision_config, grids_thw or [np.zeros((0, 3), np.int64)]).slots


def _patch_frames(grid_thw: np.ndarray, merge: int) -> tuple[np.ndarray, ...]:
    """Per real patch: (row, col, frame index 0.., offset within the frame, frame height, frame width),
    for patches in the processor's block-major order."""
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
    frames_before = np.repeat(np.cumsum(grid_thw[:, 0]) - grid_thw[:, 0], counts)
    frame = frames_before + offset_in_image // frame_size
    return block_row * merge + in_row, block_col * merge + in_col, frame, within, heights, widths


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Align-corners bilinear taps [n, 2] and weights [n, 2] into a `side`-long axis (fp32 like torch)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.clip(np.float32(1) - distance, 0, None).astype(np.float32)
    return taps, weights


def _window_layout(vision_config, shape: SlotShape, rows, cols, widths, slot, offset, window_offset
                   ) -> dict[str, np.ndarray]:
    """Qwen2.5-VL windows: `side` merged tokens on a side, tiled from the top-left of each frame (as
    transformers' get_vision_window_index). Per patch: rows/cols/widths within its frame; slot, offset
    (position in the slot) and window_offset (first window of its frame in the slot). Inside a window,
    patches keep processor order, so each merged token's patches stay consecutive; the order of keys
    inside a window does not change attention."""
    merge, side = int(vision_config.spatial_merge_size), _window_side(vision_config)
    num_slots, slot_len, num_windows = shape.num_slots, shape.slot_len, shape.windows_per_slot
    window_len = (side * merge) ** 2
    across = -(-(widths // merge) // side)
    window = window_offset + (rows // merge // side) * across + (cols // merge // side)  # within the slot
    key = slot * num_windows + window
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    rank = np.empty_like(key)
    rank[order] = np.arange(len(key)) - np.searchsorted(sorted_key, sorted_key, side="left")
    index = np.full(num_slots * num_windows * window_len, slot_len, np.int64)
    index[key * window_len + rank] = offset
    inverse = np.full(num_slots * slot_len, num_windows * window_len, np.int64)
    inverse[slot * slot_len + offset] = window * window_len + rank
    lengths = np.maximum(np.bincount(key, minlength=num_slots * num_windows), 1)
    return {
        "vision_slot_window_index": index.reshape(num_slots, num_windows, window_len).astype(np.int32),
        "vision_slot_window_lengths": lengths.reshape(num_slots, num_windows).astype(np.int32),
        "vision_slot_window_inverse": inverse.reshape(num_slots, slot_len).astype(np.int32),
    }


def _check_fits(vision_config, grid_thw: np.ndarray, slots: SlotShape, sizes: np.ndarray,
                slot_windows: np.ndarray) -> None:
    merge2 = int(vision_config.spatial_merge_size) ** 2
    is_windowed = vision_arch(vision_config) == "qwen2_5_vl"
    longest = int(sizes.max()) if len(sizes) else 0
    windows = int(slot_windows.max()) if len(slot_windows) else 0
    shared = len(slot_windows) < len(sizes)  # some slot holds several frames
    if (len(slot_windows) > slots.num_slots or longest > slots.slot_len or slots.slot_len % merge2
            or (shared and not slots.packed) or (is_windowed and windows > slots.windows_per_slot)):
        raise ValueError(
            f"slots={tuple(slots)} do not fit {len(sizes)} frames of up to {longest} patches "
            f"({len(slot_windows)} slots{f' of up to {windows} windows' if is_windowed else ''}"
            f"{', frames sharing slots need packed=True' if shared else ''}; slot_len must be a multiple of "
            f"spatial_merge_size**2={merge2}); use vision_inputs.slot_shape(vision_config, *grids) -> "
            f"{tuple(slot_shape(vision_config, grid_thw))} for this grid, with the grids of every batch stacked "
            "together"
        )


def vision_inputs(vision_config, grid_thw: np.ndarray, num_patches_padded: int,
                  slots: SlotShape | tuple | None = None) -> dict[str, np.ndarray]:
    """Vision-tower metadata for the images in `grid_thw` [n, 3] (t, h, w in patches) whose patches are
    padded to `num_patches_padded` rows of pixel_values. slots: the slot layout's shape (default
    `slot_shape(vision_config, grid_thw)`). Returns the `vision_*` arrays of the module docstring."""
    arch = vision_arch(vision_config)
    num_patches_padded = int(num_patches_padded)
    grid_thw = _check_grid(vision_config, grid_thw, num_patches_padded)
    slots = slot_shape(vision_config, grid_thw) if slots is None else SlotShape(*slots)
    sizes, windows = _frames(vision_config, grid_thw)
    frame_slot, frame_offset, frame_window_offset, slot_windows = _pack(sizes, windows, slots.slot_len, slots.windows_per_slot)
    _check_fits(vision_config, grid_thw, slots, sizes, slot_windows)
    merge = int(vision_config.spatial_merge_size)
    unit = merge * merge
    num_slots, slot_len = slots.num_slots, slots.slot_len
    rows, cols, frame, within, heights, widths = _patch_frames(grid_thw, merge)
    num_real = len(rows)
    slot, offset = frame_slot[frame], frame_offset[frame] + within  # per real patch: slot, position in it
    position = slot * slot_len + offset  # flat slot position

    def to_slots(values: np.ndarray, fill, dtype) -> np.ndarray:
        out = np.full((num_slots * slot_len,) + values.shape[1:], fill, dtype)
        out[position] = values
        return out.reshape((num_slots, slot_len) + values.shape[1:])

    merged_rows = np.full(num_patches_padded // unit, num_slots * slot_len // unit, np.int64)
    merged_rows[:num_real // unit] = position[::unit] // unit
    out = {
        "vision_slot_patches": to_slots(np.arange(num_real), num_patches_padded, np.int32),
        "vision_slot_positions": to_slots(np.stack([rows, cols], axis=1), 0, np.int32),
        "vision_merged_rows": merged_rows.astype(np.int32),
    }
    if slots.packed:
        out["vision_slot_segments"] = to_slots(frame + 1, 0, np.int32)
    else:
        out["vision_slot_lengths"] = np.maximum(np.bincount(slot, minlength=num_slots), 1).astype(np.int32)
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
        out["vision_slot_interp_indices"] = to_slots(indices, 0, np.int32)
        out["vision_slot_interp_weights"] = to_slots(weights, 0, np.float32)
    else:
        out.update(_window_layout(vision_config, slots, rows, cols, widths, slot, offset,
                                  frame_window_offset[frame]))
    return out
