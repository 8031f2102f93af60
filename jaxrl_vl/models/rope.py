"""Multimodal rotary position embedding (M-RoPE) for the Qwen-VL text decoder.

Two parts:
  * `mrope_position_ids` (host side, numpy, vectorized): the [3, B, L] (temporal, height, width) position
    ids that transformers' `get_rope_index` computes, for batches with several images per row, text-only
    rows, left/right padding, and packed rows (positions restart at every segment).
  * `rotary_cos_sin` / `apply_rotary` (device side, jax): Qwen2.5-VL's sectioned layout (frequency chunks
    [T | H | W] of sizes mrope_section) and Qwen3-VL's interleaved layout (T H W T H W ... T).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def mrope_position_ids(input_ids: np.ndarray, segment_ids: np.ndarray, image_grid_thw: np.ndarray | None,
                       image_token_id: int, spatial_merge_size: int) -> np.ndarray:
    """[3, B, L] int32 M-RoPE positions, equal to transformers' get_rope_index (images only).

    input_ids: int [B, L]; segment_ids: int [B, L] (0 = padding, k > 0 = k-th packed example of the row);
    image_grid_thw: int [N_img, 3] in order of appearance row-major over (b, l) (patch grid, before merge).
    Text tokens advance the position by 1; an image block (a maximal run of image tokens) starting at
    position s gets (t, h, w) = (s + t_i, s + h_i, s + w_i) over its merged grid and advances the position
    by max(h, w) // merge. Padding gets 0. Positions restart at 0 at the start of each segment.
    """
    input_ids = np.asarray(input_ids)
    segment_ids = np.asarray(segment_ids)
    if input_ids.shape != segment_ids.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {input_ids.shape} and segment_ids {segment_ids.shape} must both be [B, L]")
    batch, length = input_ids.shape
    real = segment_ids > 0
    is_image = (input_ids == image_token_id) & real
    prev_segment = np.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    segment_start = real & (segment_ids != prev_segment)
    prev_image = np.pad(is_image[:, :-1], ((0, 0), (1, 0)))
    image_start = is_image & ~(prev_image & ~segment_start)

    grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    num_blocks = int(image_start.sum())
    if num_blocks != grid.shape[0]:
        raise ValueError(f"input_ids contain {num_blocks} image-token blocks (runs of image_token_id={image_token_id}) "
                         f"but image_grid_thw has {grid.shape[0]} rows; they must match one to one")
    merged_t = grid[:, 0]
    merged_h = grid[:, 1] // spatial_merge_size
    merged_w = grid[:, 2] // spatial_merge_size
    tokens_per_image = merged_t * merged_h * merged_w
    advance_per_image = np.maximum(merged_h, merged_w)

    flat_index = np.arange(batch * length).reshape(batch, length)
    # image id of each image token: running count of block starts in row-major order (b, l)
    image_id = (np.cumsum(image_start.reshape(-1)) - 1).reshape(batch, length)
    image_id_clipped = np.clip(image_id, 0, max(grid.shape[0] - 1, 0))
    block_start_index = np.maximum.accumulate(np.where(image_start, flat_index, 0).reshape(-1)).reshape(batch, length)
    offset_in_image = flat_index - block_start_index
    if grid.shape[0]:
        block_len = np.bincount(image_id[is_image], minlength=grid.shape[0])
        wrong = np.nonzero(block_len != tokens_per_image)[0]
        if wrong.size:
            k = int(wrong[0])
            raise ValueError(f"image {k}: its image-token block has {int(block_len[k])} tokens but image_grid_thw "
                             f"{grid[k].tolist()} needs t*h*w/merge^2 = {int(tokens_per_image[k])}")

    advance = np.where(real & ~is_image, 1, 0) + np.where(image_start, advance_per_image[image_id_clipped] if
                                                             grid.shape[0] else 0, 0)
    inclusive = np.cumsum(advance, axis=1)
    exclusive = inclusive - advance
    segment_start_col = np.maximum.accumulate(np.where(segment_start, np.arange(length)[None, :], 0), axis=1)
    start = exclusive - np.take_along_axis(exclusive, segment_start_col, axis=1)  # position where token's run starts

    positions = np.broadcast_to(start, (3, batch, length)).copy()
    if grid.shape[0]:
        block_start_col = block_start_index % length
        image_pos0 = np.take_along_axis(start, block_start_col, axis=1)
        hw = merged_h[image_id_clipped] * merged_w[image_id_clipped]
        w_size = np.maximum(merged_w[image_id_clipped], 1)
        t_off = offset_in_image // np.maximum(hw, 1)
        h_off = (offset_in_image % np.maximum(hw, 1)) // w_size
        w_off = offset_in_image % w_size
        for axis, off in enumerate((t_off, h_off, w_off)):
            positions[axis] = np.where(is_image, image_pos0 + off, positions[axis])
    positions = np.where(real[None], positions, 0)
    return positions.astype(np.int32)


def inv_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                    rope_scaling: tuple = ()) -> tuple[np.ndarray, float]:
    """([head_dim/2] float32 inverse frequencies, attention scaling of cos/sin), as transformers computes
    them (float32 arithmetic) for rope_type "default", "linear" and "yarn"."""
    params = dict(rope_scaling)
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    pos_freqs = np.float32(theta) ** exponent
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(params["factor"])
    if rope_type == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_type={rope_type!r} is not supported (default, linear, yarn)")
    return _yarn(head_dim, theta, factor, params, pos_freqs)


def _yarn(head_dim: int, theta: float, factor: float, params: dict, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    """transformers' _compute_yarn_parameters, in numpy."""
    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    original = params["original_max_position_embeddings"]

    def correction_dim(rotations):
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (np.float32(1) - ramp).astype(np.float32)
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def frequency_axes(head_dim: int, mrope_section: tuple[int, ...], interleaved: bool) -> np.ndarray:
    """[head_dim/2] int: which position axis (0=T, 1=H, 2=W) drives each rotary frequency."""
    half = head_dim // 2
    if interleaved:  # Qwen3-VL: T H W T H W ..., H/W only for i < 3 * section
        i = np.arange(half)
        axes = np.zeros(half, np.int32)
        axes[(i % 3 == 1) & (i < 3 * mrope_section[1])] = 1
        axes[(i % 3 == 2) & (i < 3 * mrope_section[2])] = 2
        return axes
    # Qwen2.5-VL: chunk c of the split by mrope_section uses axis c % 3
    return np.concatenate([np.full(size, c % 3, np.int32) for c, size in enumerate(mrope_section)])


def rotary_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...],
                   interleaved: bool, dtype=jnp.float32, rope_type: str = "default",
                   rope_scaling: tuple = ()) -> tuple[jax.Array, jax.Array]:
    """position_ids int [3, B, L] -> (cos, sin) each [B, L, head_dim] in `dtype` (as transformers casts)."""
    inv_freq, attention_scaling = inv_frequencies(head_dim, theta, rope_type, rope_scaling)
    inv_freq = jnp.asarray(inv_freq)
    axes = frequency_axes(head_dim, tuple(mrope_section), interleaved)
    pos = position_ids.astype(jnp.float32)[axes]  # [half, B, L]: the position each frequency sees
    freqs = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, L, half]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, heads, head_dim]; cos/sin [B, L, head_dim]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
