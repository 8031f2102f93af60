"""Qwen-VL model (Qwen3-VL and Qwen2.5-VL): token embedding + vision tower + text decoder + LM head.

Pure functions over a params tree keyed like the transformers-5 module names:
  params["model"]["language_model"]  embed_tokens, layers (stacked), norm
  params["model"]["visual"]          the vision tower (jaxrl_vl.models.vision)
  params["lm_head"]                  only when the embeddings are not tied
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vl.activation_sharding import BATCH, constrain, take_per_shard
from jaxrl_vl.models.checkpoint import expected_shapes, from_hf_state_dict
from jaxrl_vl.models.config import ModelConfig
from jaxrl_vl.models.layers import dot_fp32_out
from jaxrl_vl.models.text import decoder
from jaxrl_vl.models.vision import apply_vision

_INIT_STD = 0.02


def init(config: ModelConfig, rng: jax.Array) -> dict:
    """Random fp32 params with the checkpoint's exact structure: weights ~ N(0, 0.02) (as transformers'
    initializer_range), norm weights 1, biases 0."""
    # One host-side generator seeded from the jax key: drawing per tensor with jax.random would compile
    # one kernel per distinct shape, which dominates init time for small models.
    seed = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
    generator = np.random.default_rng(seed)
    state = {}
    for name, shape in sorted(expected_shapes(config).items()):
        is_norm = any(part in name for part in ("norm", "ln_q")) and name.endswith(".weight")
        if is_norm:
            state[name] = np.ones(shape, np.float32)
        elif name.endswith(".bias"):
            state[name] = np.zeros(shape, np.float32)
        else:
            state[name] = generator.standard_normal(shape, np.float32) * np.float32(_INIT_STD)
    return jax.tree_util.tree_map(jnp.asarray, from_hf_state_dict(state, config))


def embedding_table(params: dict) -> jax.Array:
    return params["model"]["language_model"]["embed_tokens"]["weight"]


def unembed(params: dict, hidden: jax.Array, config: ModelConfig) -> jax.Array:
    """hidden [..., D] -> logits [..., V] float32 (lm_head, or the token embedding when tied).

    Multiplies in hidden's dtype and accumulates in fp32. A LoRA overlay on lm_head is honoured."""
    dtype = hidden.dtype
    logits = dot_fp32_out(hidden, _head_matrix(params, config).astype(dtype))
    lm_head = params.get("lm_head", {})
    if "lora_A" in lm_head:
        low = jnp.einsum("...d,rd->...r", hidden, lm_head["lora_A"].astype(dtype))
        logits = logits + lm_head["lora_scale"] * jnp.einsum(
            "...r,vr->...v", low, lm_head["lora_B"].astype(dtype), preferred_element_type=jnp.float32)
    return logits


def _head_matrix(params: dict, config: ModelConfig) -> jax.Array:
    """The [V, D] unembedding: lm_head, or the token embedding when tied."""
    return embedding_table(params) if config.tie_word_embeddings else params["lm_head"]["weight"]


def unembedding(params: dict, config: ModelConfig):
    """What losses.chunked_token_logprobs takes: the [V, D] unembedding matrix (its fast path), or a
    function hidden -> logits when a LoRA overlay adapts lm_head."""
    if "lora_A" in params.get("lm_head", {}):
        return lambda hidden: unembed(params, hidden, config)
    return _head_matrix(params, config)


def _place_per_token(is_image: jax.Array, rows: jax.Array) -> jax.Array:
    """[B, L] mask, [S, M, D] image embeddings of S batch shards -> [B, L, D]: in each shard (B/S contiguous
    rows), the k-th True position (row-major) gets the shard's rows[k], others 0.

    The index is a per-row cumsum plus the image tokens of the shard's earlier rows (a cumsum over B/S rows),
    and the gather is batched over the shard axis, so on a batch-split mesh every device indexes only its own
    rows and embeddings: no image embedding is all-gathered. Text positions index one past the end and read
    the fill value 0: the gradient (a scatter-add into rows) then drops them instead of adding their zeros
    onto one clamped row, which serialised the scatter's atomics (1.3 ms of an H100 2B step)."""
    num_shards, num_rows = rows.shape[:2]
    by_shard = is_image.reshape(num_shards, -1, is_image.shape[-1])  # [S, B/S, L]
    per_row = jnp.sum(by_shard, axis=-1, dtype=jnp.int32)
    earlier_rows = jnp.cumsum(per_row, axis=-1) - per_row
    index = earlier_rows[..., None] + jnp.cumsum(by_shard, axis=-1, dtype=jnp.int32) - 1
    index = jnp.where(by_shard, index, num_rows)
    out = take_per_shard(rows, index).reshape(is_image.shape + rows.shape[-1:])
    return constrain(out, BATCH, None, None)


def has_images(batch: dict) -> bool:
    pixels = batch.get("pixel_values")
    return pixels is not None and math.prod(pixels.shape) > 0


def embed_inputs(params: dict, batch: dict, config: ModelConfig, dtype=jnp.float32,
                 remat: str = "none") -> tuple[jax.Array, jax.Array | None]:
    """Token embeddings with the vision tower's outputs placed at image-token positions.

    Returns (inputs_embeds [B, L, D] in dtype, deepstack [n, B, L, D] or None). Within each batch shard, the
    k-th image token in row-major (b, l) order receives the shard's k-th merged vision embedding, as
    transformers' masked_scatter does for one shard."""
    input_ids = batch["input_ids"]
    embeds = constrain(embedding_table(params)[input_ids].astype(dtype), BATCH, None, None)
    if not has_images(batch):
        return embeds, None
    pixel_values = batch["pixel_values"]
    if pixel_values.ndim != 3 or input_ids.shape[0] % pixel_values.shape[0]:
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} must be [num_shards, num_patches, patch_dim] "
                         f"with num_shards dividing the {input_ids.shape[0]} rows; build the batch with "
                         "models.inputs.make_batch")
    vinputs = {k: v for k, v in batch.items() if k.startswith("vision_")}
    image_embeds, deepstack = apply_vision(params["model"]["visual"], config.vision, pixel_values, vinputs, dtype,
                                           remat=remat)
    is_image = input_ids == config.image_token_id
    embeds = jnp.where(is_image[..., None], _place_per_token(is_image, image_embeds.astype(dtype)), embeds)
    if deepstack is None or config.arch != "qwen3_vl" or deepstack.shape[0] == 0:
        return embeds, None
    dense = jax.vmap(lambda rows: _place_per_token(is_image, rows.astype(dtype)))(deepstack)
    return embeds, dense


def apply(params: dict, batch: dict, config: ModelConfig, *, dtype=jnp.float32, remat: str = "none",
          return_hidden: bool = False, attention: str = "auto", layer_loop: str = "scan") -> jax.Array:
    """Forward pass. batch: input_ids [B, L], segment_ids [B, L], position_ids [3, B, L], and optionally
    pixel_values [S, P_s, C*T*p*p] + the vision_* arrays [S, ...] of S batch shards (models.inputs.make_batch).

    Returns logits [B, L, V] float32, or the final normed hidden states [B, L, D] (in dtype) when
    return_hidden (for chunked cross-entropy via `unembed`). attention: the text decoder's attention
    implementation (models.text.ATTENTION_IMPLS; "auto" = cuDNN on GPU in bf16, else XLA). layer_loop: the
    text decoder's "scan" | "unrolled" (models.text.decoder)."""
    embeds, deepstack = embed_inputs(params, batch, config, dtype, remat)
    hidden = decoder(params["model"]["language_model"], embeds, batch["position_ids"], batch["segment_ids"],
                     config.text, dtype=dtype, remat=remat, deepstack_embeds=deepstack, attention=attention,
                     layer_loop=layer_loop)
    if return_hidden:
        return hidden
    return unembed(params, hidden, config)


def num_params(params: dict) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
