"""Qwen-VL text decoder (Qwen3-VL and Qwen2.5-VL), pure functions over an HF-named params tree.

params["layers"] holds every decoder layer stacked on axis 0 and is run with `jax.lax.scan`, so the
compiled program has one layer body whatever the depth; or, in the unstacked layout (models.layout), a
Python list of per-layer params run by a Python loop (layer_loop "unrolled").
Per-arch differences (all from TextConfig):
  Qwen3-VL: RMSNorm over head_dim on q and k (before RoPE), interleaved M-RoPE, optional attention bias,
            DeepStack: visual features of the first ViT taps are added at image positions after
            decoder layers 0..n_deepstack-1.
  Qwen2.5-VL: q/k/v bias, no o_proj bias, sectioned M-RoPE, optional sliding window for late layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_vl.activation_sharding import BATCH, TENSOR, constrain
from jaxrl_vl.models import layers
from jaxrl_vl.models.config import TextConfig
from jaxrl_vl.models.layers import gated_activation, linear, rms_norm
from jaxrl_vl.models.rope import apply_rotary, rotary_cos_sin

# "auto": cuDNN flash attention on GPU for bf16/fp16 (takes the packing mask as a bias, never builds the
#   [B, heads, L, L] logits), XLA otherwise.  "xla" / "cudnn": force one.  "cudnn_causal": cuDNN's built-in
#   causal + padding mask with no bias at all (fastest), ONLY valid for unpacked rows (segment ids 1 on real
#   tokens, right-padded with 0); packed rows would attend across examples.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "cudnn_causal")


def attention_implementation(requested: str, dtype, head_dim: int) -> str:
    """Resolves "auto" to "cudnn" (GPU, bf16/fp16, head_dim a multiple of 8 and <= 128) or "xla"."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention={requested!r} is not one of {ATTENTION_IMPLS}")
    if requested != "auto":
        return requested
    cudnn_ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if cudnn_ok else "xla"


def attention_mask(segment_ids: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """bool [B, 1, L, L]: causal, and only within the same segment id (packing).

    Padding (segment 0) attends to earlier padding only; its outputs are ignored, but every query row keeps
    at least itself so no row is fully masked (no NaN in the softmax or its gradient)."""
    length = segment_ids.shape[1]
    q_index = jnp.arange(length)[:, None]
    k_index = jnp.arange(length)[None, :]
    mask = (k_index <= q_index)[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if sliding_window is not None:
        mask = mask & (q_index - k_index < sliding_window)[None]
    return mask[:, None]


def _attention(p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, mask, cfg: TextConfig,
               dtype, impl: str = "xla") -> jax.Array:
    """x [B, L, D] -> [B, L, D]. GQA: num_attention_heads query heads share num_key_value_heads k/v heads.

    mask: bool [B, 1, L, L] for impl "xla"/"cudnn"; int32 [B] real-token counts for "cudnn_causal"."""
    batch, length, _ = x.shape
    # heads split like the column-parallel q/k/v weights (Megatron); batch over (data, fsdp)
    heads = lambda y, n: constrain(y.reshape(batch, length, n, cfg.head_dim), BATCH, None, TENSOR, None)  # noqa: E731
    q = heads(linear(p["q_proj"], x, dtype), cfg.num_attention_heads)
    k = heads(linear(p["k_proj"], x, dtype), cfg.num_key_value_heads)
    v = heads(linear(p["v_proj"], x, dtype), cfg.num_key_value_heads)
    if cfg.qk_norm:
        q = rms_norm(p["q_norm"], q, cfg.rms_norm_eps)
        k = rms_norm(p["k_norm"], k, cfg.rms_norm_eps)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    scale = cfg.head_dim ** -0.5
    if impl == "cudnn_causal":
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=mask,
                                           key_value_seq_lengths=mask, implementation="cudnn")
    elif impl == "cudnn":  # is_causal lets cuDNN skip the upper-triangle tiles; the mask adds packing
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                           implementation="cudnn")
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    out = linear(p["o_proj"], out.reshape(batch, length, cfg.num_attention_heads * cfg.head_dim), dtype)
    return constrain(out, BATCH, None, None)


def decoder_layer(p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, mask, cfg: TextConfig,
                  dtype, attention_impl: str = "xla") -> jax.Array:
    """One pre-norm decoder layer. x [B, L, D] in the compute dtype."""
    h = rms_norm(p["input_layernorm"], x, cfg.rms_norm_eps)
    x = x + _attention(p["self_attn"], h, cos, sin, mask, cfg, dtype, attention_impl)
    h = rms_norm(p["post_attention_layernorm"], x, cfg.rms_norm_eps)
    mlp = p["mlp"]
    gated = gated_activation(cfg.hidden_act)(linear(mlp["gate_proj"], h, dtype), linear(mlp["up_proj"], h, dtype))
    gated = constrain(gated, BATCH, None, TENSOR)
    return constrain(x + linear(mlp["down_proj"], gated, dtype), BATCH, None, None)


def decoder(params: dict, inputs_embeds: jax.Array, position_ids: jax.Array, segment_ids: jax.Array,
            cfg: TextConfig, *, dtype=jnp.float32, remat: str = "none",
            deepstack_embeds: jax.Array | None = None, attention: str = "auto",
            layer_loop: str = "scan") -> jax.Array:
    """Runs all decoder layers and the final norm.

    params: the `model.language_model` subtree (layers stacked, or a list: then always the Python loop,
    whatever layer_loop says). inputs_embeds [B, L, D];
    position_ids int [3, B, L]; segment_ids int [B, L];
    deepstack_embeds: [n, B, L, D] dense per-token additions after layers 0..n-1 (zeros off image tokens).
    attention: one of ATTENTION_IMPLS (see there; "cudnn_causal" only for unpacked rows).
    layer_loop: "scan" (jax.lax.scan over the stacked layers: one compiled layer, fast compiles) or
      "unrolled" (a Python loop: every layer compiled; the backward pass reads each layer's saved
      activations directly instead of copying them in and out of [num_layers, ...] stacks, which costs
      ~10% of a GPU step at 2B scale, at the price of a longer compile).
    Returns the normed hidden states [B, L, D] in `dtype`.
    """
    cos, sin = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section,
                              cfg.mrope_interleaved, dtype, cfg.rope_type, cfg.rope_scaling)
    sliding = cfg.sliding_layers()
    impl = attention_implementation(attention, dtype, cfg.head_dim)
    if impl == "cudnn_causal" and any(sliding):
        impl = "cudnn"  # sliding-window layers need the explicit mask
    if impl == "cudnn_causal":
        full_mask = jnp.sum(segment_ids > 0, axis=1).astype(jnp.int32)  # [B] real tokens per row
    else:
        full_mask = attention_mask(segment_ids)
    sliding_mask = attention_mask(segment_ids, cfg.sliding_window) if any(sliding) else None
    num_deepstack = 0 if deepstack_embeds is None else deepstack_embeds.shape[0]

    # The residual stream [B, L, D] stays split by batch (see activation_sharding): without these pins
    # XLA may all-gather it over the batch rather than gather the FSDP-split weights.
    if num_deepstack:
        deepstack_embeds = constrain(deepstack_embeds, None, BATCH, None, None)

    def body(x, layer):
        layer_params, layer_index, is_sliding = layer
        x = constrain(x, BATCH, None, None)
        mask = full_mask if sliding_mask is None else jnp.where(is_sliding, sliding_mask, full_mask)
        x = decoder_layer(layer_params, x, cos, sin, mask, cfg, dtype, impl)
        if num_deepstack:
            # DeepStack: add the visual features of tap `layer_index` after the first n layers
            extra = deepstack_embeds[jnp.minimum(layer_index, num_deepstack - 1)].astype(x.dtype)
            x = x + jnp.where(layer_index < num_deepstack, extra, jnp.zeros_like(extra))
        return constrain(x, BATCH, None, None), None

    x = constrain(inputs_embeds.astype(dtype), BATCH, None, None)
    if isinstance(params["layers"], list):  # unstacked layout (models.layout): a Python loop, no slicing at all
        if len(params["layers"]) != cfg.num_hidden_layers:
            raise ValueError(f"params['layers'] has {len(params['layers'])} layers, config "
                             f"num_hidden_layers={cfg.num_hidden_layers}")
        block = layers.remat(body, remat)
        for index, layer_params in enumerate(params["layers"]):
            x, _ = block(x, (layer_params, jnp.asarray(index), jnp.asarray(sliding[index], bool)))
        return constrain(rms_norm(params["norm"], x, cfg.rms_norm_eps), BATCH, None, None)
    stacked = (params["layers"], jnp.arange(cfg.num_hidden_layers), jnp.asarray(sliding, bool))
    if layer_loop == "scan":
        x, _ = jax.lax.scan(layers.remat(body, remat), x, stacked)
    elif layer_loop == "unrolled":
        block = layers.remat(body, remat)
        for layer in layers.unstack(stacked, cfg.num_hidden_layers):
            x, _ = block(x, layer)
    else:
        raise ValueError(f"layer_loop={layer_loop!r}: choose 'scan' or 'unrolled'")
    return constrain(rms_norm(params["norm"], x, cfg.rms_norm_eps), BATCH, None, None)
