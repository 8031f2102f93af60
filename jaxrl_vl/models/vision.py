"""Qwen3-VL and Qwen2.5-VL vision towers as pure functions over HF-named, block-stacked params.

`apply_vision(params_visual, vision_config, pixel_values, vinputs, dtype)` reproduces transformers'
`Qwen3VLVisionModel` / `Qwen2_5_VisionTransformerPretrainedModel` on padded batch shards of patches:
  pixel_values [S, P_s, C*T*p*p] (each batch shard's images' patches concatenated, padded to P_s),
  vinputs: the `vision_*` arrays [S, ...] of models.inputs.make_batch (the model batch dict works too);
  or one shard without the shard axis: pixel_values [P, C*T*p*p] and `vision_inputs.vision_inputs`'s arrays.
Returns (image_embeds [S, P_s//m^2, out_hidden], deepstack_embeds [n_deepstack, S, P_s//m^2, out_hidden] |
None), each shard's merged tokens in its processor order (one shard: without the S axis). Rows past a shard's
real merged tokens are padding (zeros) and must be ignored by the caller.

The whole tower runs in the slot layout of vision_inputs ([N slots, L positions]; a frame fills a run
of one slot, and mixed-size frames share slots): the patches are gathered into slots once, every block
works on [S*N, L, hidden] (the shards' slots side by side: every block op is per slot), attention is one
batched call over slots, and the merged tokens are gathered back to processor order at the end. Both
gathers are batched over the shard axis, which sharding.batch_shardings splits over (data, fsdp), and the
merger's activations are pinned to it: a device reads only its own shards' pixels and slots, and no pixel
or image embedding crosses batch shards. Attention within a slot: with one frame per slot, a key-padding
length per slot (no mask tensor: cuDNN flash attention on GPU); with frames sharing slots, a segment
mask [N, 1, L, L] from vision_slot_segments (jax's cuDNN path takes it as an additive bias). Why the
whole tower and not only attention: (1) no gather/scatter per layer; (2) with the shard (so the slot)
axis split over devices, every op is local, so FSDP splits the vision compute instead of replicating it;
(3) padding positions (slot_len rounding, packing gaps, empty slots) stay well under the power-of-two
padding of P that the [P, P] masked attention it replaces ran its MLPs on (vision_inputs' docstring has
the numbers). Qwen2.5-VL's windowed layers gather each slot's windows ([N, W, Lw], within the slot, so
still local; windows never cross frames, so they need no segments) around their attention.
Blocks run under `jax.lax.scan` over the stacked "blocks" params, or as a Python loop when "blocks" is a
list of per-block params (the unstacked layout, models.layout).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrl_vl.activation_sharding import BATCH, TENSOR, constrain, take_per_shard
from jaxrl_vl.models.layers import activation, gated_activation, layer_norm, linear, recomputed_activation, rms_norm
from jaxrl_vl.models.layers import remat as remat_block
from jaxrl_vl.models.vision_inputs import vision_arch

NORM_EPS = 1e-6  # transformers hard-codes eps=1e-6 for every vision norm of both towers.


def _rope_theta(vision_config) -> float:
    theta = getattr(vision_config, "rope_theta", None)
    rope_parameters = getattr(vision_config, "rope_parameters", None)
    if theta is None and isinstance(rope_parameters, dict):
        theta = rope_parameters.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _rotary_cos_sin(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D axial rotary tables [..., head_dim] (fp32) for position_ids [..., 2]: the first half of the rotated pairs use the
    patch row, the second half the column, with the same head_dim//4 frequencies."""
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [..., 2, head_dim//4]
    freqs = jnp.concatenate([freqs[..., 0, :], freqs[..., 1, :]], axis=-1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention_implementation(dtype, head_dim: int, slot_len: int, masked: bool) -> str | None:
    """cuDNN flash attention on GPU for bf16/fp16, XLA otherwise. jax's cuDNN path turns a boolean mask
    into an additive bias, and its backward with a bias needs even sequence lengths (else XLA)."""
    cudnn_ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0 and head_dim <= 128 and not (masked and slot_len % 2))
    return "cudnn" if cudnn_ok else None


def _take_slots(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [N, L, ...], index [N, K] (positions within each slot; out of range -> zeros) -> [N, K, ...].
    A gather batched over the slot axis, so it stays local when that axis is split over devices."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1, mode="fill", fill_value=0)


def _slot_attention(q: jax.Array, k: jax.Array, v: jax.Array, dtype, lengths: jax.Array | None = None,
                    segments: jax.Array | None = None) -> jax.Array:
    """Bidirectional attention inside each slot, over its first `lengths` keys or, given `segments`
    [S, L], between positions of the same segment. q/k/v: [S, L, heads, hd]."""
    head_dim, slot_len = q.shape[-1], q.shape[1]
    mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
    implementation = _attention_implementation(dtype, head_dim, slot_len, mask is not None)
    return jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5, key_value_seq_lengths=lengths,
                                        mask=mask, implementation=implementation)


def _attention(p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, vinputs: dict, windowed,
               num_heads: int, dtype) -> jax.Array:
    """Self-attention within each frame of a slot, or within each window of it when `windowed` (a traced
    bool, Qwen2.5-VL). x: [N, L, H]; cos/sin: [N, L, head_dim]."""
    num_slots, slot_len, hidden = x.shape
    head_dim = hidden // num_heads
    qkv = linear(p["qkv"], x, dtype).reshape(num_slots, slot_len, 3, num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Rotary in fp32, as transformers' apply_rotary_pos_emb_vision does.
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    q = (q32 * cos + _rotate_half(q32) * sin).astype(dtype)
    k = (k32 * cos + _rotate_half(k32) * sin).astype(dtype)

    def per_frame(q, k, v):
        return _slot_attention(q, k, v, dtype, lengths=vinputs.get("vision_slot_lengths"),
                               segments=vinputs.get("vision_slot_segments"))

    def per_window(q, k, v):
        index = vinputs["vision_slot_window_index"]  # [N, W, Lw]
        windows = index.shape[1] * num_slots
        gather = lambda t: _take_slots(t, index.reshape(num_slots, -1)).reshape(
            windows, index.shape[2], num_heads, head_dim)
        out = _slot_attention(gather(q), gather(k), gather(v), dtype,
                              vinputs["vision_slot_window_lengths"].reshape(windows))
        return _take_slots(out.reshape(num_slots, -1, num_heads, head_dim), vinputs["vision_slot_window_inverse"])

    if windowed is None:
        out = per_frame(q, k, v)
    elif isinstance(windowed, bool):  # a Python loop over blocks knows each block's type
        out = per_window(q, k, v) if windowed else per_frame(q, k, v)
    else:  # only the taken branch runs (the layer type is per scan step)
        out = jax.lax.cond(windowed, per_window, per_frame, q, k, v)
    return linear(p["proj"], out.reshape(num_slots, slot_len, hidden), dtype)


def _qwen3_block(p: dict, x, cos, sin, vinputs, vision_config, dtype):
    act = recomputed_activation(vision_config.hidden_act)
    h = layer_norm(p["norm1"], x, NORM_EPS)
    x = x + constrain(_attention(p["attn"], h, cos, sin, vinputs, None, int(vision_config.num_heads), dtype),
                      BATCH, None, None)
    h = layer_norm(p["norm2"], x, NORM_EPS)
    mlp = p["mlp"]
    hidden = constrain(act(linear(mlp["linear_fc1"], h, dtype)), BATCH, None, TENSOR)
    return constrain(x + linear(mlp["linear_fc2"], hidden, dtype), BATCH, None, None)


def _qwen2_5_block(p: dict, x, cos, sin, vinputs, windowed, vision_config, dtype):
    gated_act = gated_activation(vision_config.hidden_act)
    h = rms_norm(p["norm1"], x, NORM_EPS)
    x = x + constrain(_attention(p["attn"], h, cos, sin, vinputs, windowed, int(vision_config.num_heads), dtype),
                      BATCH, None, None)
    h = rms_norm(p["norm2"], x, NORM_EPS)
    mlp = p["mlp"]
    gated = constrain(gated_act(linear(mlp["gate_proj"], h, dtype), linear(mlp["up_proj"], h, dtype)), BATCH, None,
                      TENSOR)
    return constrain(x + linear(mlp["down_proj"], gated, dtype), BATCH, None, None)


def _scan_blocks(block_fn, blocks: dict, x: jax.Array, per_layer, remat: str) -> jax.Array:
    """Run `block_fn(layer_params, x, layer_extra)` over the leading axis of `blocks` (and `per_layer`)."""
    step = remat_block(lambda carry, layer: (block_fn(layer[0], carry, layer[1]), None), remat)
    x, _ = jax.lax.scan(step, x, (blocks, per_layer))
    return x


def _run_blocks(block_fn, blocks, x: jax.Array, per_layer: list, remat: str, start: int = 0,
                stop: int | None = None) -> jax.Array:
    """Blocks start..stop-1 of a stack (scanned) or of a list (a Python loop: no slices of a stack).
    per_layer: one Python value per block; the loop passes it to block_fn as is (static), the scan as an array."""
    stop = len(per_layer) if stop is None else stop
    if not isinstance(blocks, list):
        return _scan_blocks(block_fn, _slice_layers(blocks, start, stop), x, jnp.asarray(per_layer[start:stop]),
                            remat)
    if len(blocks) != len(per_layer):
        raise ValueError(f"params['blocks'] has {len(blocks)} blocks, vision depth is {len(per_layer)}")
    for p, extra in zip(blocks[start:stop], per_layer[start:stop]):
        # the same jax.checkpoint policy per block as the scan body; `extra` closed over to stay static
        x = remat_block(lambda h, p, extra=extra: block_fn(p, h, extra), remat)(x, p)
    return x


def _patch_embed(p: dict, pixel_values: jax.Array, dtype) -> jax.Array:
    """Conv3d with kernel == stride is a linear map over each flattened (C, T, p, p) patch."""
    weight = p["weight"]
    return linear({**p, "weight": weight.reshape(weight.shape[0], -1)}, pixel_values, dtype)


def _slice_layers(tree: dict, start: int, stop: int) -> dict:
    if start == 0 and stop == len(jax.tree_util.tree_leaves(tree)[0]):
        return tree  # the whole stack: no slice op
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


def _qwen3_merger(p: dict, x: jax.Array, merged_dim: int, postshuffle_norm: bool, dtype) -> jax.Array:
    """Patch merger: LayerNorm (per patch, or over the merged 4H vector for DeepStack), fc1, GELU, fc2.
    x [N, L, H] -> [N*L//m^2, out]: each run of m^2 slot positions is one merged token."""
    if postshuffle_norm:
        x = layer_norm(p["norm"], x.reshape(-1, merged_dim), NORM_EPS)
    else:
        x = layer_norm(p["norm"], x, NORM_EPS).reshape(-1, merged_dim)
    return _merger_mlp(p["linear_fc1"], p["linear_fc2"], x, dtype)


def _merger_mlp(fc1: dict, fc2: dict, merged: jax.Array, dtype) -> jax.Array:
    """fc2(GELU(fc1(merged))) on merged tokens [S*N*L//m^2, m^2*H], which stay with their slots' batch shards
    (pinned, or XLA gathers them all to multiply by the FSDP-split weights); fc1 column-, fc2 row-parallel."""
    merged = constrain(merged, BATCH, None)
    hidden = constrain(activation("gelu")(linear(fc1, merged, dtype)), BATCH, TENSOR)
    return constrain(linear(fc2, hidden, dtype), BATCH, None)


def _to_processor_order(merged: jax.Array, vinputs: dict) -> jax.Array:
    """Merged slot rows [..., S*N*L//m^2, D] (shards in order) -> [..., S, P_s//m^2, D], each shard's in its
    processor order (padding rows 0)."""
    merged_rows = vinputs["vision_merged_rows"]  # [S, P_s//m^2], rows of the shard's own N*L//m^2
    by_shard = merged.reshape(merged.shape[:-2] + (merged_rows.shape[0], -1, merged.shape[-1]))
    return take_per_shard(by_shard, merged_rows, axis=merged.ndim - 2)


def _apply_qwen3(params, vision_config, x, vinputs, dtype, remat):
    weights = vinputs["vision_slot_interp_weights"].astype(jnp.float32)
    # The whole (small) table on every device, so each looks up its own slots' taps (else XLA gathers every
    # slot's indices to look them up in its FSDP slice of the table).
    table = constrain(jnp.asarray(params["pos_embed"]["weight"], jnp.float32), None, None)
    pos = constrain(jnp.sum(table[vinputs["vision_slot_interp_indices"]] * weights[..., None], axis=-2),
                    BATCH, None, None)
    x = x + pos.astype(x.dtype)

    head_dim = int(vision_config.hidden_size) // int(vision_config.num_heads)
    cos, sin = _rotary_cos_sin(vinputs["vision_slot_positions"], head_dim, _rope_theta(vision_config))
    block_fn = lambda p, h, _: _qwen3_block(p, h, cos, sin, vinputs, vision_config, dtype)

    depth = int(vision_config.depth)
    merged_dim = int(vision_config.hidden_size) * int(vision_config.spatial_merge_size) ** 2
    deepstack_indexes = [int(i) for i in vision_config.deepstack_visual_indexes]
    if sorted(deepstack_indexes) != deepstack_indexes or any(not 0 <= i < depth for i in deepstack_indexes):
        raise ValueError(f"deepstack_visual_indexes={deepstack_indexes} must be increasing and within depth={depth}")
    # Scan the blocks in runs that end at each DeepStack layer, so the tapped features are plain values.
    # With a list of blocks (unstacked layout) each run is a Python loop and the mergers are list entries.
    deepstack, start = [], 0
    for k, stop in enumerate(deepstack_indexes + [depth - 1]):
        if stop + 1 > start:
            x = _run_blocks(block_fn, params["blocks"], x, [0.0] * depth, remat, start, stop + 1)
            start = stop + 1
        if k < len(deepstack_indexes):
            mergers = params["deepstack_merger_list"]
            merger_k = (mergers[k] if isinstance(mergers, list)
                        else jax.tree_util.tree_map(lambda a: a[k], mergers))
            deepstack.append(_qwen3_merger(merger_k, x, merged_dim, True, dtype))
    image_embeds = _to_processor_order(_qwen3_merger(params["merger"], x, merged_dim, False, dtype), vinputs)
    return image_embeds, (_to_processor_order(jnp.stack(deepstack), vinputs) if deepstack else None)


def _apply_qwen2_5(params, vision_config, x, vinputs, dtype, remat):
    head_dim = int(vision_config.hidden_size) // int(vision_config.num_heads)
    cos, sin = _rotary_cos_sin(vinputs["vision_slot_positions"], head_dim, _rope_theta(vision_config))
    depth = int(vision_config.depth)
    full_indexes = [int(i) for i in vision_config.fullatt_block_indexes]
    windowed = [i not in full_indexes for i in range(depth)]
    block_fn = lambda p, h, is_windowed: _qwen2_5_block(p, h, cos, sin, vinputs, is_windowed, vision_config, dtype)
    x = _run_blocks(block_fn, params["blocks"], x, windowed, remat)
    merger = params["merger"]
    merged_dim = int(vision_config.hidden_size) * int(vision_config.spatial_merge_size) ** 2
    h = rms_norm(merger["ln_q"], x, NORM_EPS).reshape(-1, merged_dim)
    return _to_processor_order(_merger_mlp(merger["mlp"]["0"], merger["mlp"]["2"], h, dtype), vinputs), None


def apply_vision(params_visual: dict, vision_config, pixel_values: jax.Array, vinputs: dict,
                 dtype=jnp.float32, remat: str = "none") -> tuple[jax.Array, jax.Array | None]:
    """Vision tower forward. pixel_values: [S, P_s, C*T*p*p] with vinputs [S, ...] (make_batch's batch shards),
    or [P, C*T*p*p] with one shard's vinputs (vision_inputs.vision_inputs) for the same P.

    Returns image_embeds [S, P_s//m^2, out_hidden] in `dtype` and, for Qwen3-VL, deepstack_embeds
    [len(deepstack_visual_indexes), S, P_s//m^2, out_hidden] (None for Qwen2.5-VL); without the S axis for
    one unstacked shard. remat: a layers.REMAT_POLICIES name (jax.checkpoint policy applied per block).
    """
    if pixel_values.ndim == 2:  # one shard, as vision_inputs builds it
        shard = {k: v[None] for k, v in vinputs.items() if k.startswith("vision_")}
        embeds, deepstack = apply_vision(params_visual, vision_config, pixel_values[None], shard, dtype, remat)
        return embeds[0], (None if deepstack is None else deepstack[:, 0])
    _check_vision_inputs(vision_config, pixel_values, vinputs)
    # Gather each shard's pixel rows into its slots first (padding positions read zeros), then embed: the
    # patch embedding then runs on the slot layout too, split over devices with the shards.
    slot_pixels = take_per_shard(pixel_values, vinputs["vision_slot_patches"])  # [S, N, L, D]
    # The shards' slots side by side, [S*N, ...]: every op of the blocks is per slot.
    vinputs = {k: (v.reshape((-1,) + v.shape[2:]) if k.startswith("vision_slot_") else v)
               for k, v in vinputs.items()}
    x = constrain(_patch_embed(params_visual["patch_embed"]["proj"],
                               slot_pixels.reshape((-1,) + slot_pixels.shape[2:]), dtype), BATCH, None, None)
    if vision_arch(vision_config) == "qwen3_vl":
        return _apply_qwen3(params_visual, vision_config, x, vinputs, dtype, remat)
    return _apply_qwen2_5(params_visual, vision_config, x, vinputs, dtype, remat)


def _check_vision_inputs(vision_config, pixel_values: jax.Array, vinputs: dict) -> None:
    arch = vision_arch(vision_config)
    patch_dim = (int(vision_config.in_channels) * int(vision_config.temporal_patch_size)
                 * int(vision_config.patch_size) ** 2)
    if pixel_values.ndim != 3 or pixel_values.shape[2] != patch_dim:
        raise ValueError(
            f"pixel_values must be [num_shards, num_patches, in_channels*temporal_patch_size*patch_size**2="
            f"{patch_dim}] (or one shard's [num_patches, {patch_dim}]), got {tuple(pixel_values.shape)}"
        )
    required = ["vision_slot_patches", "vision_slot_positions", "vision_merged_rows"] + (
        ["vision_slot_interp_indices", "vision_slot_interp_weights"] if arch == "qwen3_vl"
        else ["vision_slot_window_index", "vision_slot_window_lengths", "vision_slot_window_inverse"])
    missing = [key for key in required if key not in vinputs]
    if ("vision_slot_lengths" in vinputs) == ("vision_slot_segments" in vinputs):
        missing.append("exactly one of vision_slot_lengths / vision_slot_segments")
    if missing:
        raise ValueError(f"vinputs lacks {missing} for arch={arch}; build it with models.inputs.make_batch (or, "
                         "for one shard, vision_inputs.vision_inputs(vision_config, grid_thw, num_patches))")
    unit = int(vision_config.spatial_merge_size) ** 2
    num_shards, num_patches = pixel_values.shape[:2]
    shards = {key: tuple(vinputs[key].shape[:1]) for key in vinputs if key.startswith("vision_")}
    if any(shape != (num_shards,) for shape in shards.values()):
        raise ValueError(f"pixel_values has {num_shards} batch shards (leading axis) but the vision_* arrays' "
                         f"leading axes are {shards}; build them together with models.inputs.make_batch")
    if vinputs["vision_merged_rows"].shape[1] * unit != num_patches:
        raise ValueError(
            f"vision_merged_rows covers {vinputs['vision_merged_rows'].shape[1] * unit} patches per shard but "
            f"pixel_values has {num_patches}; build vinputs with num_patches_padded=pixel_values.shape[-2]"
        )


def vision_param_shapes(vision_config) -> dict[str, tuple[int, ...]]:
    """Dotted HF names (relative to `model.visual.`) -> shapes, with "blocks" and
    "deepstack_merger_list" stacked on a leading axis, as `apply_vision` expects them."""
    arch = vision_arch(vision_config)
    h, i = int(vision_config.hidden_size), int(vision_config.intermediate_size)
    d, out = int(vision_config.depth), int(vision_config.out_hidden_size)
    p, t, c = int(vision_config.patch_size), int(vision_config.temporal_patch_size), int(vision_config.in_channels)
    merged = h * int(vision_config.spatial_merge_size) ** 2
    shapes = {"patch_embed.proj.weight": (h, c, t, p, p)}

    def dense(name, n_out, n_in, lead=()):
        shapes[f"{name}.weight"] = (*lead, n_out, n_in)
        shapes[f"{name}.bias"] = (*lead, n_out)

    dense("blocks.attn.qkv", 3 * h, h, (d,))
    dense("blocks.attn.proj", h, h, (d,))
    if arch == "qwen3_vl":
        shapes["patch_embed.proj.bias"] = (h,)
        shapes["pos_embed.weight"] = (int(vision_config.num_position_embeddings), h)
        for norm in ("blocks.norm1", "blocks.norm2"):
            shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (d, h)
        dense("blocks.mlp.linear_fc1", i, h, (d,))
        dense("blocks.mlp.linear_fc2", h, i, (d,))
        shapes["merger.norm.weight"] = shapes["merger.norm.bias"] = (h,)
        dense("merger.linear_fc1", merged, merged)
        dense("merger.linear_fc2", out, merged)
        n = len(vision_config.deepstack_visual_indexes)
        if n:
            shapes["deepstack_merger_list.norm.weight"] = shapes["deepstack_merger_list.norm.bias"] = (n, merged)
            dense("deepstack_merger_list.linear_fc1", merged, merged, (n,))
            dense("deepstack_merger_list.linear_fc2", out, merged, (n,))
    else:
        shapes["blocks.norm1.weight"] = shapes["blocks.norm2.weight"] = (d, h)
        dense("blocks.mlp.gate_proj", i, h, (d,))
        dense("blocks.mlp.up_proj", i, h, (d,))
        dense("blocks.mlp.down_proj", h, i, (d,))
        shapes["merger.ln_q.weight"] = (h,)
        dense("merger.mlp.0", merged, merged)
        dense("merger.mlp.2", out, merged)
    return shapes


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_leaves(named_shapes: tuple, initializer_range: float, rng: jax.Array) -> list[jax.Array]:
    # One compiled program for every leaf (eager per-shape random calls each compile separately).
    leaves = []
    for key, (name, shape) in zip(jax.random.split(rng, len(named_shapes)), named_shapes):
        if ".norm" in name or "ln_q" in name:
            leaves.append(jnp.ones(shape, jnp.float32) if name.endswith("weight") else jnp.zeros(shape, jnp.float32))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, jnp.float32))
        else:
            leaves.append(initializer_range * jax.random.normal(key, shape, jnp.float32))
    return leaves


def init_vision(vision_config, rng: jax.Array, initializer_range: float = 0.02) -> dict:
    """Random fp32 vision params shaped like `vision_param_shapes` (transformers' init: weights
    N(0, initializer_range), biases 0, norm scales 1)."""
    named_shapes = tuple(sorted(vision_param_shapes(vision_config).items()))
    params: dict = {}
    for (name, _), value in zip(named_shapes, _init_leaves(named_shapes, float(initializer_range), rng)):
        node = params
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params
