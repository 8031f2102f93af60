"""Weighted next-token NLL whose gradient is formed in the forward pass (a fused linear cross-entropy).

    chunked_weighted_nll(hidden, unembed, targets, weights) = sum_t weights[t] * -log p(targets[t] | hidden[t])

For a loss that is linear in the per-token log-probabilities with weights known up front (SFT, Tinker's
`cross_entropy`), the gradient of each chunk is fixed once its logits exist: d/dz = w * (softmax - one_hot).
So the forward pass computes every chunk's logits once, forms that softmax gradient in the same pass, and
runs the two gradient matmuls right away (hidden gradient per chunk, unembedding gradient accumulated in
fp32); the backward pass only scales the stored gradients by the incoming cotangent. Against
`chunked_token_logprobs` (logprobs first, gradient later) this saves one [tokens, H] x [H, V] matmul and one
pass over the fp32 logits per chunk: on the 2B shape (V = 151936) 9 ms of a 250 ms H100 step.

Losses that are not linear in the logprobs (PPO, GRPO: ratios and clipping) need the logprobs before their
gradient is known; they keep `chunked_token_logprobs`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrl_vl.losses.sft import chunk_logits, to_chunks


def chunked_weighted_nll(hidden: jax.Array, unembed: jax.Array, targets: jax.Array, weights: jax.Array, *,
                         chunk_size: int = 1024, dtype=None, unroll: int = 1) -> jax.Array:
    """hidden [B, L, H] (final-norm output), unembed [V, H] (lm_head / tied embedding), targets int [B, L],
    weights float [B, L] (0 = not a target; any sign) -> fp32 scalar sum(weights * -logprobs).

    chunk_size: sequence positions per chunk; peak extra memory ~ B * chunk_size * V * 4 bytes plus one
      fp32 [V, H] gradient accumulator. dtype: matmul input dtype (default hidden's); softmax and
      accumulation are fp32. unroll: chunks per loop iteration (lax.scan's unroll); unrolled, XLA may
      compute several chunks' logits at once, trading memory for fewer loop iterations."""
    if callable(unembed):
        raise TypeError("chunked_weighted_nll needs the [V, H] unembedding matrix; with a LoRA overlay on "
                        "lm_head use chunked_token_logprobs + cross_entropy_loss")
    dtype = dtype or hidden.dtype
    # padded positions get weight 0: no loss, no gradient
    h, t, w = to_chunks(chunk_size, hidden.astype(dtype), targets=targets.astype(jnp.int32),
                        weights=weights.astype(jnp.float32))
    return _fused_nll(h, unembed.astype(dtype), t, w, max(1, min(int(unroll), h.shape[0])))


def _logsumexp(z: jax.Array) -> jax.Array:
    """logsumexp over the last axis in one read of z (fp32 [B, C, V], the largest array of the step): a variadic
    reduce carrying (running max m, sum of exp(z - m)) instead of a max pass and then a sum pass."""
    def combine(a, b):
        m = jnp.maximum(a[0], b[0])
        return m, a[1] * jnp.exp(a[0] - m) + b[1] * jnp.exp(b[0] - m)

    # a finite lowest start: combining two untouched accumulators gives exp(0) * 0, never exp(-inf + inf)
    lowest = jnp.array(jnp.finfo(z.dtype).min, z.dtype)
    m, total = jax.lax.reduce((z, jnp.ones_like(z)), (lowest, jnp.zeros((), z.dtype)), combine, (z.ndim - 1,))
    return m + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_nll(h, w, targets, weights, unroll):
    """h [n, B, C, H], w [V, H], targets [n, B, C], weights [n, B, C] -> fp32 scalar."""
    return _fused_nll_fwd(h, w, targets, weights, unroll)[0]


def _fused_nll_fwd(h, w, targets, weights, unroll):
    def one_chunk(d_w, chunk):
        h_c, t_c, w_c = chunk
        logits = chunk_logits(h_c, w)
        log_normalizer = _logsumexp(logits)
        logprobs = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0] - log_normalizer
        one_hot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == t_c[..., None]
        # d(-w * logp)/dz = w * (p - one_hot), in the matmul dtype for the two gradient matmuls
        g_z = (w_c[..., None] * (jnp.exp(logits - log_normalizer[..., None]) - one_hot)).astype(h_c.dtype)
        d_h = jnp.einsum("bcv,vd->bcd", g_z, w, preferred_element_type=jnp.float32).astype(h_c.dtype)
        d_w = d_w + jnp.einsum("bcv,bcd->vd", g_z, h_c, preferred_element_type=jnp.float32)
        # tokens with weight 0 count exactly 0, in the value and in d/dweights (as cross_entropy_loss)
        logprobs = jnp.where(w_c != 0, logprobs, 0.0)
        return d_w, (jnp.sum(-w_c * logprobs), d_h, logprobs)

    d_w, (nll, d_h, logprobs) = jax.lax.scan(one_chunk, jnp.zeros(w.shape, jnp.float32), (h, targets, weights),
                                             unroll=unroll)
    # the unembedding gradient leaves in w's dtype, as chunked_token_logprobs' backward gives it
    return jnp.sum(nll), (d_h, d_w.astype(w.dtype), logprobs)


def _fused_nll_bwd(unroll, residuals, g):
    d_h, d_w, logprobs = residuals
    return (d_h * g.astype(d_h.dtype), d_w * g.astype(d_w.dtype), None,
            -logprobs * g)  # linear in the weights: d/dw_t = -logp_t (0 where w_t = 0)


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)
