"""Small pure building blocks shared by the vision tower and the text decoder.

Every weight keeps its Hugging Face orientation (`weight` is [out, in]), so checkpoint
conversion is a rename, never a transpose. A module's params are a dict:
  {"weight": [out, in], "bias": [out] (optional),
   "lora_A": [r, in], "lora_B": [out, r], "lora_scale": [] (optional, see models/lora.py)}
Master weights stay in their stored dtype (fp32); `dtype` is the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(p: dict, x: jax.Array, dtype=None) -> jax.Array:
    """y = x W^T + b (+ scale * (x A^T) B^T when a LoRA overlay is present). x: [..., in]."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    y = x @ p["weight"].astype(dtype).T
    if "lora_A" in p:
        low_rank = (x @ p["lora_A"].astype(dtype).T) @ p["lora_B"].astype(dtype).T
        y = y + p["lora_scale"].astype(dtype) * low_rank
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def rms_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32 (as transformers does), returned in x's dtype. x: [..., d]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (p["weight"].astype(jnp.float32) * x32).astype(x.dtype)


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with weight and bias, computed in fp32. x: [..., d]."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["weight"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def activation(name: str):
    """HF activation names -> jax functions."""
    table = {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        # further transformers ACT2FN names a config may carry
        "swish": jax.nn.silu,
        "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "sigmoid": jax.nn.sigmoid,
        "tanh": jnp.tanh,
    }
    if name not in table:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(table)}")
    return table[name]
