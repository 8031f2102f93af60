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


@jax.custom_vjp
def dot_fp32_out(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] @ w[V, D]^T -> [..., V] in fp32 (accumulated in fp32), for logits.

    The gradient is taken in the inputs' dtype: plain autodiff would feed the fp32 cotangent into
    both backward matmuls, turning them into fp32 (TF32) GEMMs that run at a fraction of bf16 speed;
    for fp32 inputs nothing changes."""
    return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)


def dot_fp32_out_grads(x: jax.Array, w: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dx, dw) of dot_fp32_out for the logits cotangent g, both matmuls in x's dtype."""
    g = g.astype(x.dtype)
    dx = jnp.einsum("...v,vd->...d", g, w.astype(x.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum("...v,...d->vd", g, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


dot_fp32_out.defvjp(lambda x, w: (dot_fp32_out(x, w), (x, w)),
                    lambda residuals, g: dot_fp32_out_grads(*residuals, g))


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


def gated_activation(name: str):
    """(gate, up) -> act(gate) * up, the SwiGLU-style MLP product, under jax.checkpoint: the backward keeps
    only gate and up (matmul outputs, saved anyway) and recomputes act inside its own fusion. Without it the
    forward also writes act(gate) as a residual: one more [tokens, intermediate] buffer per layer (1.2 GiB of
    a 2B H100 step at 8k tokens)."""
    act = activation(name)
    return jax.checkpoint(lambda gate, up: act(gate) * up)


def recomputed_activation(name: str):
    """act under jax.checkpoint: only its input is kept for the backward, not its internals (gelu's tanh)."""
    return jax.checkpoint(activation(name))


def _save_dots_and_attention(prim, *args, **params) -> bool:
    """dots_with_no_batch_dims_saveable, plus the outputs of cuDNN's flash-attention forward (the
    attention output and its softmax statistics: O(L) per head), so the backward pass does not re-run
    the attention forward. The XLA attention is made of batched dots and is recomputed as with "dots"."""
    return (prim.name.startswith("dot_product_attention_fwd")
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# Per-layer rematerialisation (jax.checkpoint policy of each scanned block), memory high -> low:
#   none       save everything (no recompute)
#   dots_attn  save matmul outputs and the cuDNN attention forward: recompute only elementwise ops
#   dots       save matmul outputs: recompute elementwise ops and attention
#   full       save only the block inputs: recompute the whole block
REMAT_POLICIES = {
    "none": None,
    "dots_attn": _save_dots_and_attention,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def unstack(stacked, num: int) -> list:
    """A pytree of [num, ...] arrays -> num pytrees of [...] slices. lax.split's transpose is one
    concatenate, so the gradient of the stack is built once (indexing each slice would instead add
    up num zero-padded copies of the whole stack)."""
    leaves, treedef = jax.tree.flatten(stacked)
    parts = [jax.lax.split(leaf, [1] * num, axis=0) for leaf in leaves]
    return [jax.tree.unflatten(treedef, [part[i][0] for part in parts]) for i in range(num)]


def remat(fn, name: str):
    """fn wrapped in jax.checkpoint with the REMAT_POLICIES[name] policy ("none": fn unchanged)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} is not one of {list(REMAT_POLICIES)}")
    return fn if name == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[name])

