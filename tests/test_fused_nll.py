"""chunked_weighted_nll (gradient formed in the forward pass) against autodiff of full logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vl.losses import chunked_weighted_nll, cross_entropy_loss, token_logprobs


def _inputs(length, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    batch, hidden_size, vocab = 2, 16, 50
    hidden = jnp.asarray(rng.normal(size=(batch, length, hidden_size)), dtype)
    unembed = jnp.asarray(rng.normal(size=(vocab, hidden_size)) * 0.3, dtype)
    targets = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
    weights = rng.normal(size=(batch, length)).astype(np.float32)  # negative ones too
    weights[:, ::3] = 0.0  # non-targets
    return hidden, unembed, targets, jnp.asarray(weights)


def _reference(h, w, targets, weights):
    logits = jnp.einsum("blh,vh->blv", h.astype(jnp.float32), w.astype(jnp.float32))
    return cross_entropy_loss(token_logprobs(logits, targets), weights)


@pytest.mark.parametrize("chunk_size,length,unroll", [(4, 12, 1), (5, 12, 2), (64, 7, 1)])
def test_value_and_all_gradients_match_autodiff(chunk_size, length, unroll):
    hidden, unembed, targets, weights = _inputs(length)
    scale = 0.37  # an upstream cotangent other than 1 (e.g. dividing by the target count)

    def fused(h, w, wt):
        return scale * chunked_weighted_nll(h, w, targets, wt, chunk_size=chunk_size, unroll=unroll)

    def reference(h, w, wt):
        return scale * _reference(h, w, targets, wt)

    v_ref, g_ref = jax.value_and_grad(reference, argnums=(0, 1, 2))(hidden, unembed, weights)
    v_fused, g_fused = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(hidden, unembed, weights)
    np.testing.assert_allclose(v_fused, v_ref, rtol=1e-5)
    for name, a, b in zip(("hidden", "unembed", "weights"), g_fused, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


def test_bf16_inputs_give_bf16_gradients_close_to_fp32():
    hidden, unembed, targets, weights = _inputs(12)
    grad = jax.jit(jax.grad(lambda h, w: chunked_weighted_nll(h, w, targets, weights, chunk_size=4), argnums=(0, 1)))
    g16 = grad(hidden.astype(jnp.bfloat16), unembed.astype(jnp.bfloat16))
    g32 = jax.grad(lambda h, w: _reference(h, w, targets, weights), argnums=(0, 1))(hidden, unembed)
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.05, rtol=0.05)


def test_logits_are_computed_once_per_chunk():
    """The point of the fusion: the backward pass recomputes nothing, so the compiled gradient program has
    exactly 3 matmuls per chunk (logits, hidden gradient, unembedding gradient)."""
    hidden, unembed, targets, weights = _inputs(12)
    grad = jax.jit(jax.grad(lambda h, w: chunked_weighted_nll(h, w, targets, weights, chunk_size=12),
                            argnums=(0, 1)))
    hlo = grad.lower(hidden, unembed).as_text()  # before XLA's own rewrites
    assert hlo.count("dot_general") == 3, hlo


def test_bad_shapes_and_a_callable_unembedding_are_refused():
    hidden, unembed, targets, weights = _inputs(12)
    with pytest.raises(ValueError, match="weights shape"):
        chunked_weighted_nll(hidden, unembed, targets, weights[:, :5])
    with pytest.raises(TypeError, match="LoRA"):
        chunked_weighted_nll(hidden, lambda h: h @ unembed.T, targets, weights)



def test_one_pass_logsumexp_matches_the_two_pass_one_on_extreme_logits():
    """The variadic-reduce logsumexp (running max, rescaled sum) against jax.nn.logsumexp: large magnitudes,
    ties, one dominant entry, and a row of the lowest float."""
    from jaxrl_vl.losses.fused_nll import _logsumexp
    rng = np.random.default_rng(0)
    rows = np.stack([rng.normal(size=257) * 1e4, np.full(257, 3.0), np.r_[1e3, np.zeros(256)],
                     np.full(257, np.finfo(np.float32).min / 2), rng.normal(size=257)]).astype(np.float32)
    got, want = jax.jit(_logsumexp)(jnp.asarray(rows)), jax.nn.logsumexp(jnp.asarray(rows), axis=-1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
