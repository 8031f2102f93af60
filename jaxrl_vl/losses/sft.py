"""Token log-probabilities and the (weighted) cross-entropy loss.

Two ways to get per-token logprobs of the target tokens:
  token_logprobs(logits, targets)                    from full logits [B, L, V]
  chunked_token_logprobs(hidden, unembed, targets)   from final hidden states [B, L, H], computing
      logits chunk by chunk over the sequence under jax.checkpoint, so the [B, L, V] fp32 logits
      (e.g. 8 x 8192 x 151936 x 4 bytes = 40 GB) never exist at once, forward or backward.
Both return fp32 [B, L] (and optionally the entropy of the full next-token distribution).

Both score the distribution a sampler draws from: softmax((logits + logit_bias) / temperature), as
vLLM's processed logprobs report it (`--logprobs-mode processed_logprobs`: logit bias, then
temperature). logit_bias: static ((token_id, bias), ...) pairs, as sent in vLLM's sampling params.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxrl_vl.activation_sharding import BATCH, TENSOR, constrain
from jaxrl_vl.losses.aggregate import masked
from jaxrl_vl.models.layers import dot_fp32_out, dot_fp32_out_grads


def sampled_logits(logits: jax.Array, temperature: float = 1.0, logit_bias: tuple = ()) -> jax.Array:
    """fp32 (logits + logit_bias) / temperature over the last (vocab) axis: what a sampler draws from."""
    logits = logits.astype(jnp.float32)
    if logit_bias:
        ids, values = zip(*logit_bias)
        logits = logits + jnp.zeros(logits.shape[-1], jnp.float32).at[jnp.asarray(ids)].set(jnp.asarray(values))
    return logits / temperature if temperature != 1.0 else logits


def _logprobs_from_logits(logits: jax.Array, targets: jax.Array, temperature: float, logit_bias: tuple,
                          return_entropy: bool):
    logits = sampled_logits(logits, temperature, logit_bias)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    logprobs = target_logits[..., 0] - log_normalizer
    if not return_entropy:
        return logprobs, None, log_normalizer
    probs = jax.nn.softmax(logits, axis=-1)
    entropy = log_normalizer - jnp.sum(probs * logits, axis=-1)
    return logprobs, entropy, log_normalizer


def token_logprobs(logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0, logit_bias: tuple = (),
                   return_entropy: bool = False):
    """logits [B, L, V], targets int [B, L] -> logprobs fp32 [B, L] (, entropy [B, L])."""
    logprobs, entropy, _ = _logprobs_from_logits(logits, targets, temperature, logit_bias, return_entropy)
    return (logprobs, entropy) if return_entropy else logprobs


def chunked_token_logprobs(hidden: jax.Array, unembed: jax.Array | Callable, targets: jax.Array,
                           *, chunk_size: int = 1024, dtype=jnp.float32,
                           temperature: float = 1.0, logit_bias: tuple = (), return_entropy: bool = False):
    """hidden [B, L, H] (final-norm output), targets int [B, L] -> logprobs fp32 [B, L]
    (, entropy fp32 [B, L]).

    unembed: the unembedding matrix [V, H] (HF `lm_head.weight` orientation; the tied
      `embed_tokens.weight` for tied models), or a function h [..., H] -> logits [..., V]
      (use this when the unembedding has a LoRA overlay).
    chunk_size: sequence positions per chunk; peak memory ~ B * chunk_size * V * 4 bytes.
    dtype: matmul input dtype for the matrix form (accumulation and the softmax are fp32); a
      function `unembed` chooses its own precision.
    """
    batch, length, _ = hidden.shape
    hidden_chunks, target_chunks = to_chunks(chunk_size, hidden, targets=targets)

    if callable(unembed):
        def logits_of(h):
            # batch-split like the hidden states, vocab over "tensor" only: one consistent FSDP plan
            # (gather the unembedding, reduce-scatter its gradient) in the forward and the backward.
            return constrain(unembed(h), BATCH, None, TENSOR)

        # jax.checkpoint: the backward pass recomputes each chunk's logits instead of storing them.
        @jax.checkpoint
        def one_chunk(args):
            h, t = args
            logprobs, entropy, _ = _logprobs_from_logits(logits_of(h), t, temperature, logit_bias, return_entropy)
            return (logprobs, entropy) if return_entropy else (logprobs,)
    else:
        matrix = unembed.astype(dtype)

        def one_chunk(args):
            h, t = args
            logprobs, entropy = _chunk_logprobs(h.astype(dtype), matrix, t, temperature, logit_bias, return_entropy)
            return (logprobs, entropy) if return_entropy else (logprobs,)

    outputs = jax.lax.map(one_chunk, (hidden_chunks, target_chunks))  # walks the leading (chunk) axis
    # [n, B, C] -> [B, L]
    outputs = [o.swapaxes(0, 1).reshape(batch, -1)[:, :length] for o in outputs]
    return tuple(outputs) if return_entropy else outputs[0]


def to_chunks(chunk_size: int, hidden: jax.Array, **per_token: jax.Array) -> list[jax.Array]:
    """hidden [B, L, H] and per-token arrays [B, L] (named only for the error message) -> the same, zero-padded
    to whole chunks and reshaped [n, B, C, ...], each chunk keeping the mesh's batch split (activation_sharding;
    a no-op without one). n = ceil(L / chunk_size) chunks of equal length C = ceil(L / n) <= chunk_size, so
    padding stays under n positions (L = 3328 at chunk_size 1024: 4 x 832, not 4 x 1024). Padded positions
    need weight 0 downstream."""
    batch, length = hidden.shape[:2]
    for name, value in per_token.items():
        if value.shape != (batch, length):
            raise ValueError(f"{name} shape {value.shape} must be hidden's [B, L] = {(batch, length)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_chunks = -(-length // chunk_size)
    chunk = -(-length // num_chunks)
    out = []
    for x in (hidden, *per_token.values()):
        x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - length)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(batch, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
        out.append(constrain(x, None, BATCH, *([None] * (x.ndim - 2))))
    return out


def chunk_logits(h, w):
    """One chunk's fp32 logits h [B, C, H] @ w [V, H]^T, batch-split, vocab over "tensor"."""
    return constrain(dot_fp32_out(h, w), BATCH, None, TENSOR)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunk_logprobs(h, w, targets, temperature: float, logit_bias: tuple, return_entropy: bool):
    """One chunk of the matrix form: h [B, C, H] @ w [V, H]^T -> (logprobs [B, C], entropy [B, C] | None).

    A hand-written backward keeps only the log-normalizer per token and recomputes the logits once;
    the softmax gradient (one-hot - p, plus the entropy term) is formed in one pass and handed to the
    two backward matmuls in h's dtype. (Autodiff under jax.checkpoint would redo the reductions,
    scatter the one-hot into an fp32 copy and convert it in separate passes over [B, C, V].)"""
    return _chunk_logprobs_fwd(h, w, targets, temperature, logit_bias, return_entropy)[0]


def _chunk_logprobs_fwd(h, w, targets, temperature, logit_bias, return_entropy):
    logits = chunk_logits(h, w)
    logprobs, entropy, log_normalizer = _logprobs_from_logits(logits, targets, temperature, logit_bias,
                                                              return_entropy)
    return (logprobs, entropy), (h, w, targets, log_normalizer, entropy)


def _chunk_logprobs_bwd(temperature, logit_bias, return_entropy, residuals, cotangents):
    h, w, targets, log_normalizer, entropy = residuals
    g_logprobs, g_entropy = cotangents
    z = sampled_logits(chunk_logits(h, w), temperature, logit_bias)  # the bias is constant: dz/dlogits = 1/T
    probs = jnp.exp(z - log_normalizer[..., None])
    one_hot = jnp.arange(z.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    g_z = g_logprobs[..., None] * (one_hot - probs)
    if return_entropy:
        # H = lse - sum p z  ->  dH/dz_j = p_j * (sum_k p_k z_k - z_j) = p_j * (lse - H - z_j)
        g_z = g_z + g_entropy[..., None] * probs * ((log_normalizer - entropy)[..., None] - z)
    if temperature != 1.0:
        g_z = g_z / temperature
    d_h, d_w = dot_fp32_out_grads(h, w, g_z)
    return d_h, d_w, None


_chunk_logprobs.defvjp(_chunk_logprobs_fwd, _chunk_logprobs_bwd)


def cross_entropy_loss(logprobs: jax.Array, weights: jax.Array, *,
                       reduction: str = "sum") -> jax.Array:
    """Weighted negative log-likelihood. logprobs, weights [B, L] (float; negative allowed:
    Tinker's forward_backward_custom sends -dLoss/dlogp as weights) -> scalar.

    reduction: "sum" = sum(-logp * w) (Tinker's `cross_entropy`);
               "token-mean" = that sum / number of tokens with w != 0 (SFT's usual mean).
    Tokens with w == 0 contribute exactly 0 even if their logprob is -inf (padding).
    """
    total = jnp.sum(masked(-logprobs.astype(jnp.float32), weights.astype(jnp.float32)))
    if reduction == "sum":
        return total
    if reduction == "token-mean":
        return total / jnp.maximum(jnp.sum(weights != 0), 1)
    raise ValueError(f"unknown reduction {reduction!r}; valid: 'sum', 'token-mean'")
