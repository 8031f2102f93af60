"""Losses: hand-computed values, chunked == unchunked (with grads), clip behaviour, advantages,
Tinker loss_fn definitions, registry errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vl import losses
from jaxrl_vl.losses import (PolicyLossConfig, chunked_token_logprobs, compute_advantages,
                             compute_policy_loss, cross_entropy_loss, token_logprobs)
from jaxrl_vl.losses.registry import (get_advantage, get_kl_estimator, get_policy_loss,
                                      get_tinker_loss)


# ---------------------------------------------------------------- SFT / logprobs
def test_token_logprobs_and_entropy_by_hand():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))  # [1, 2, 3]
    targets = jnp.array([[0, 2]])
    logprobs, entropy = token_logprobs(logits, targets, return_entropy=True)
    np.testing.assert_allclose(logprobs, [[math.log(0.5), math.log(0.8)]], rtol=1e-6)
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h1 = -(2 * 0.1 * math.log(0.1) + 0.8 * math.log(0.8))
    np.testing.assert_allclose(entropy, [[h0, h1]], rtol=1e-5)


def test_cross_entropy_float_and_negative_weights():
    logprobs = jnp.array([[-1.0, -2.0, -jnp.inf]])  # -inf on a padded, zero-weight position
    weights = jnp.array([[1.0, -0.5, 0.0]])
    # sum(-logp * w) = 1*1 + 2*(-0.5) = 0
    assert float(cross_entropy_loss(logprobs, weights)) == pytest.approx(0.0)
    weights = jnp.array([[0.5, 2.0, 0.0]])
    assert float(cross_entropy_loss(logprobs, weights)) == pytest.approx(4.5)
    assert float(cross_entropy_loss(logprobs, weights, reduction="token-mean")) == \
        pytest.approx(2.25)
    with pytest.raises(ValueError, match="token-mean"):
        cross_entropy_loss(logprobs, weights, reduction="mean-ish")


def test_chunks_are_balanced_so_padding_stays_below_one_position_per_chunk():
    from jaxrl_vl.losses.sft import to_chunks
    for length, chunk_size, want in [(3328, 1024, (4, 832)), (4096, 1024, (4, 1024)), (7, 64, (1, 7)),
                                     (13, 4, (4, 4))]:
        hidden, targets = to_chunks(chunk_size, jnp.zeros((2, length, 3)), targets=jnp.zeros((2, length)))
        assert hidden.shape == (*want[:1], 2, want[1], 3) and targets.shape == (want[0], 2, want[1])


@pytest.mark.parametrize("chunk_size,length", [(4, 12), (5, 12), (64, 7)])
def test_chunked_equals_unchunked_with_grads(chunk_size, length):
    rng = np.random.default_rng(0)
    batch, hidden_size, vocab = 2, 16, 50
    hidden = jnp.asarray(rng.normal(size=(batch, length, hidden_size)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(vocab, hidden_size)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(batch, length)), jnp.float32)  # negative ones too

    def full_loss(h, w):
        lp, ent = token_logprobs(jnp.einsum("blh,vh->blv", h, w), targets, return_entropy=True)
        return cross_entropy_loss(lp, weights) + 0.1 * jnp.sum(ent), (lp, ent)

    def chunked_loss(h, w):
        lp, ent = chunked_token_logprobs(h, w, targets, chunk_size=chunk_size,
                                         return_entropy=True)
        return cross_entropy_loss(lp, weights) + 0.1 * jnp.sum(ent), (lp, ent)

    (v_full, (lp_full, ent_full)), g_full = jax.value_and_grad(
        full_loss, argnums=(0, 1), has_aux=True)(hidden, unembed)
    (v_chunk, (lp_chunk, ent_chunk)), g_chunk = jax.jit(jax.value_and_grad(
        chunked_loss, argnums=(0, 1), has_aux=True))(hidden, unembed)
    np.testing.assert_allclose(lp_chunk, lp_full, atol=1e-5)
    np.testing.assert_allclose(ent_chunk, ent_full, atol=1e-5)
    np.testing.assert_allclose(v_chunk, v_full, rtol=1e-5)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The callable form (e.g. a LoRA-overlaid unembedding) gives the same numbers.
    lp_fn = chunked_token_logprobs(hidden, lambda h: h @ unembed.T, targets, chunk_size=chunk_size)
    np.testing.assert_allclose(lp_fn, lp_full, atol=1e-5)


def test_chunked_never_materializes_full_logits():
    """The jitted chunked program holds at most one chunk of logits: no [B, L, V] buffer."""
    batch, length, hidden_size, vocab, chunk = 1, 64, 8, 1000, 8
    hidden = jnp.ones((batch, length, hidden_size))
    unembed = jnp.ones((vocab, hidden_size))
    targets = jnp.zeros((batch, length), jnp.int32)
    grad_fn = jax.jit(jax.grad(lambda h, w: jnp.sum(
        chunked_token_logprobs(h, w, targets, chunk_size=chunk)), argnums=(0, 1)))
    hlo = grad_fn.lower(hidden, unembed).compile().as_text()
    assert f"f32[{batch},{length},{vocab}]" not in hlo
    assert f"f32[{batch},{chunk},{vocab}]" in hlo


# ---------------------------------------------------------------- policy losses
def _lp(x):
    return jnp.asarray(x, jnp.float32)


def test_ppo_clip_asymmetric_and_grads():
    cfg = PolicyLossConfig(name="ppo", clip_eps_low=0.2, clip_eps_high=0.28)
    old = _lp([[0.0, 0.0, 0.0, 0.0]])
    ratios = np.array([1.5, 1.25, 0.5, 0.9])
    new = _lp(np.log(ratios))[None] + old
    adv = _lp([[1.0, 1.0, -1.0, -1.0]])
    mask = _lp([[1, 1, 1, 1]])
    per_token, ind = get_policy_loss("ppo")(new, old, adv, mask, cfg)
    # A>0: min(r, 1.28) ; A<0: -max(r, 0.8) ... loss = max(-A r, -A clip(r))
    np.testing.assert_allclose(per_token[0], [-1.28, -1.25, 0.8, 0.9], rtol=1e-6)
    np.testing.assert_allclose(ind["clip_fraction"][0], [1, 0, 1, 0])
    loss, metrics = compute_policy_loss(cfg, new, old, adv, mask)
    assert float(loss) == pytest.approx(np.mean([-1.28, -1.25, 0.8, 0.9]), rel=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(0.5)
    assert float(metrics["ratio_max"]) == pytest.approx(1.5, rel=1e-6)
    assert float(metrics["ratio_min"]) == pytest.approx(0.5, rel=1e-6)
    grads = jax.grad(lambda lp: compute_policy_loss(cfg, lp, old, adv, mask)[0])(new)
    # clipped tokens get no gradient; unclipped: d(-A r)/dlogp / 4 = -A r / 4
    np.testing.assert_allclose(grads[0], [0.0, -1.25 / 4, 0.0, 0.9 / 4], rtol=1e-5)


def test_dual_clip_caps_negative_advantage_loss():
    cfg = PolicyLossConfig(name="ppo", dual_clip_c=3.0)
    new, old = _lp([[math.log(5.0), math.log(2.0)]]), _lp([[0.0, 0.0]])
    adv, mask = _lp([[-1.0, -1.0]]), _lp([[1.0, 1.0]])
    per_token, ind = get_policy_loss("ppo")(new, old, adv, mask, cfg)
    np.testing.assert_allclose(per_token[0], [3.0, 2.0], rtol=1e-6)  # 5 capped at c=3
    np.testing.assert_allclose(ind["dual_clip_fraction"][0], [1.0, 0.0])


def test_gspo_uses_sequence_ratio_with_packing():
    cfg = PolicyLossConfig(name="gspo", clip_eps_low=0.5, clip_eps_high=0.5,
                           aggregation="sequence-mean", max_segments_per_row=2)
    # one row, two packed sequences: seg 1 log-ratios (0.2, 0.4) -> s = exp(0.3); seg 2 (-0.1)
    old = _lp([[0.0, 0.0, 0.0, 0.0]])
    new = _lp([[0.2, 0.4, -0.1, 9.0]])
    adv = _lp([[1.0, 1.0, 2.0, 0.0]])
    mask = _lp([[1, 1, 1, 0]])
    seg = jnp.array([[1, 1, 2, 0]])
    per_token, _ = get_policy_loss("gspo")(new, old, adv, mask, cfg, seg)
    s1, s2 = math.exp(0.3), math.exp(-0.1)
    np.testing.assert_allclose(per_token[0, :3], [-s1, -s1, -2 * s2], rtol=1e-6)
    loss, _ = compute_policy_loss(cfg, new, old, adv, mask, segment_ids=seg)
    assert float(loss) == pytest.approx((-s1 + -2 * s2) / 2, rel=1e-6)
    grads = jax.grad(lambda lp: compute_policy_loss(cfg, lp, old, adv, mask,
                                                    segment_ids=seg)[0])(new)
    # d/dlogp_t of mean_seq(mean_tok(-A s)) = -A s / (2 seqs * n_tok)
    np.testing.assert_allclose(grads[0], [-s1 / 4, -s1 / 4, -2 * s2 / 2, 0.0], rtol=1e-5)
    with pytest.raises(ValueError, match="max_segments_per_row"):
        compute_policy_loss(PolicyLossConfig(name="gspo"), new, old, adv, mask, segment_ids=seg)


def test_cispo_and_importance_sampling_grads():
    cfg = PolicyLossConfig(name="cispo", clip_eps_low=1.0, clip_eps_high=0.2)
    new, old = _lp([[math.log(2.0), math.log(0.5)]]), _lp([[0.0, 0.0]])
    adv, mask = _lp([[1.0, -1.0]]), _lp([[1.0, 1.0]])
    grads = jax.grad(lambda lp: compute_policy_loss(cfg, lp, old, adv, mask,
                                                    )[0])(new)
    # gradient = -sg(clip(r)) * A / num_tokens ; clip(2)=1.2, clip(0.5)=0.5 (no lower bound)
    np.testing.assert_allclose(grads[0], [-1.2 / 2, 0.5 / 2], rtol=1e-6)
    cfg = PolicyLossConfig(name="importance_sampling", aggregation="sum")
    loss, _ = compute_policy_loss(cfg, new, old, adv, mask)
    assert float(loss) == pytest.approx(-2.0 + 0.5, rel=1e-6)


def test_aggregation_modes():
    per_token = _lp([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = _lp([[1, 1, 1], [1, 0, 0]])
    agg = losses.aggregate_loss
    assert float(agg("token-mean", per_token, mask)) == pytest.approx(10 / 4)
    assert float(agg("sequence-mean", per_token, mask)) == pytest.approx((2.0 + 4.0) / 2)
    assert float(agg("sequence-mean-token-sum", per_token, mask)) == pytest.approx((6 + 4) / 2)
    assert float(agg("sequence-mean-token-sum", per_token, mask, token_sum_divisor=4.0)) == \
        pytest.approx((6 + 4) / 2 / 4)
    assert float(agg("sum", per_token, mask)) == pytest.approx(10.0)


def test_truncated_importance_sampling_and_kl():
    cfg = PolicyLossConfig(name="importance_sampling", tis_cap=2.0, aggregation="sum",
                           kl_coef=0.5, kl_estimator="k1")
    new = old = _lp([[0.0, 0.0]])
    rollout = _lp([[-math.log(4.0), math.log(2.0)]])  # old/rollout = 4 (-> capped 2) and 0.5
    ref = _lp([[-1.0, 0.0]])
    adv, mask = _lp([[1.0, 1.0]]), _lp([[1.0, 1.0]])
    loss, metrics = compute_policy_loss(cfg, new, old, adv, mask, rollout_logprobs=rollout,
                                        ref_logprobs=ref)
    # policy: -(1*2 + 1*0.5) = -2.5 ; kl k1 = (0 - -1) + 0 = 1 -> +0.5
    assert float(metrics["policy_loss"]) == pytest.approx(-2.5, rel=1e-6)
    assert float(loss) == pytest.approx(-2.0, rel=1e-6)
    assert float(metrics["tis_truncated_fraction"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        compute_policy_loss(cfg, new, old, adv, mask, ref_logprobs=ref)
    with pytest.raises(ValueError, match="ref_logprobs"):
        compute_policy_loss(cfg, new, old, adv, mask, rollout_logprobs=rollout)


def test_kl_estimators_by_hand():
    lp, ref = _lp([0.0, -0.5]), _lp([-1.0, 0.0])
    d = np.array([1.0, -0.5])
    np.testing.assert_allclose(get_kl_estimator("k1")(lp, ref), d, rtol=1e-6)
    np.testing.assert_allclose(get_kl_estimator("k2")(lp, ref), 0.5 * d ** 2, rtol=1e-6)
    np.testing.assert_allclose(get_kl_estimator("k3")(lp, ref), np.exp(-d) - 1 + d, rtol=1e-6)
    rewards = losses.kl_penalized_rewards(_lp([1.0]), _lp([[0.5, 0.25, 9.0]]), _lp([[1, 1, 0]]),
                                          kl_coef=2.0)
    np.testing.assert_allclose(rewards, [1.0 - 1.5], rtol=1e-6)


# ---------------------------------------------------------------- advantages
def test_grpo_rloo_reinforce_numbers():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    std0 = np.std([1, 0, 0, 1], ddof=1)
    np.testing.assert_allclose(compute_advantages("grpo", rewards)[0],
                               np.array([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(compute_advantages("dr_grpo", rewards)[1],
                               [0.25, 0.25, 0.25, -0.75], rtol=1e-6)
    # RLOO: r_i - mean(others): group 2 -> 1 - 2/3, ..., 0 - 1
    np.testing.assert_allclose(compute_advantages("rloo", rewards)[1],
                               [1 / 3, 1 / 3, 1 / 3, -1.0], rtol=1e-5)
    flat = rewards.reshape(-1)
    np.testing.assert_allclose(compute_advantages("reinforce_plus_plus", rewards).reshape(-1),
                               (flat - flat.mean()) / (np.std(flat, ddof=1) + 1e-6), rtol=1e-5)
    centered = (rewards - rewards.mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(
        compute_advantages("reinforce_plus_plus_baseline", rewards).reshape(-1),
        (centered - centered.mean()) / (np.std(centered, ddof=1) + 1e-6), rtol=1e-5)
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages("rloo", np.ones((3, 1)))
    with pytest.raises(ValueError, match="num_groups, group_size"):
        compute_advantages("grpo", np.ones(4))


def test_zero_variance_groups_filter():
    rewards = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(losses.zero_variance_groups(rewards), [True, False, True])
    kept_rewards, kept_prompts, kept = losses.filter_zero_variance_groups(
        rewards, ["a", "b", "c"])
    np.testing.assert_array_equal(kept_rewards, [[0.0, 1.0]])
    assert kept_prompts == ["b"] and list(kept) == [1]
    np.testing.assert_allclose(compute_advantages("grpo", rewards)[0], [0.0, 0.0])
    np.testing.assert_allclose(losses.token_advantages(_lp([2.0]), _lp([[0, 1, 1]])),
                               [[0.0, 2.0, 2.0]])


# ---------------------------------------------------------------- Tinker loss_fns
def test_tinker_losses_match_docs():
    lp = _lp([-1.0, -0.5, -2.0])
    q = _lp([-1.2, -0.2, -2.0])
    adv = _lp([1.0, -1.0, 0.5])
    r = np.exp(np.array(lp) - np.array(q))
    inputs = {"logprobs": q, "advantages": adv}

    total, elementwise = losses.tinker_loss("importance_sampling", lp, inputs)
    np.testing.assert_allclose(elementwise, -r * np.array(adv), rtol=1e-6)
    assert float(total) == pytest.approx(float(np.sum(-r * np.array(adv))), rel=1e-6)

    _, elementwise = losses.tinker_loss("ppo", lp, inputs, {"clip_low_threshold": 0.9,
                                                            "clip_high_threshold": 1.1})
    expected = -np.minimum(r * adv, np.clip(r, 0.9, 1.1) * adv)
    np.testing.assert_allclose(elementwise, expected, rtol=1e-6)

    _, elementwise = losses.tinker_loss("cispo", lp, inputs)  # defaults 0.0 / 4.0
    np.testing.assert_allclose(elementwise, -np.clip(r, 0, 4) * np.array(lp) * adv, rtol=1e-6)
    grads = jax.grad(lambda x: losses.tinker_loss("cispo", x, inputs)[0])(lp)
    np.testing.assert_allclose(grads, -np.clip(r, 0, 4) * adv, rtol=1e-6)

    _, elementwise = losses.tinker_loss("dro", lp, inputs, {"beta": 0.3})
    expected = -(np.array(lp) * adv - 0.5 * 0.3 * (np.array(lp) - np.array(q)) ** 2)
    np.testing.assert_allclose(elementwise, expected, rtol=1e-6)

    total, elementwise = losses.tinker_loss(
        "cross_entropy", lp, {"weights": _lp([1.0, -2.0, 0.0])}, valid_mask=_lp([1, 1, 0]))
    np.testing.assert_allclose(elementwise, [1.0, -1.0, 0.0])
    assert float(total) == pytest.approx(0.0)


def test_tinker_bad_requests_are_clear():
    lp = _lp([-1.0])
    with pytest.raises(ValueError, match="valid keys"):
        losses.tinker_loss("ppo", lp, {"logprobs": lp, "advantages": lp}, {"epsilon": 0.2})
    with pytest.raises(ValueError, match="missing \\['advantages'\\]"):
        losses.tinker_loss("ppo", lp, {"logprobs": lp})
    with pytest.raises(ValueError, match="cispo, cross_entropy, dro, importance_sampling, ppo"):
        losses.tinker_loss("stable_reinforce", lp, {})


# ---------------------------------------------------------------- registry
def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid names: cispo, gspo, importance_sampling, ppo"):
        get_policy_loss("ppo2")
    with pytest.raises(ValueError, match="grpo.*rloo"):
        get_advantage("gae")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        get_kl_estimator("k4")
    with pytest.raises(ValueError, match="dro"):
        get_tinker_loss("nope")
    with pytest.raises(ValueError, match="token-mean"):
        PolicyLossConfig(aggregation="seq-mean")
    with pytest.raises(ValueError, match="dual_clip_c"):
        PolicyLossConfig(dual_clip_c=0.5)


def test_logits_matmul_gradient_stays_in_input_dtype():
    """dot_fp32_out: fp32 logits; its backward matmuls run in the inputs' dtype (bf16 GEMMs, not TF32)
    and, for fp32 inputs, equal plain autodiff exactly."""
    from jaxrl_vl.models.layers import dot_fp32_out

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(33, 16)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 5, 33)), jnp.float32)

    def loss(dot, x, w):
        return jnp.sum(jax.nn.log_softmax(dot(x, w)) * t)

    ours = jax.grad(lambda x, w: loss(dot_fp32_out, x, w), (0, 1))(x, w)
    plain = jax.grad(lambda x, w: loss(lambda a, b: jnp.einsum("...d,vd->...v", a, b), x, w), (0, 1))(x, w)
    for a, b in zip(ours, plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert dot_fp32_out(xb, wb).dtype == jnp.float32
    grad_fn = jax.grad(lambda x, w: loss(dot_fp32_out, x, w), (0, 1))
    dots = [e for e in _all_eqns(jax.make_jaxpr(grad_fn)(xb, wb).jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, input gradient, weight gradient
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    dx, dw = grad_fn(xb, wb)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ours[0]), atol=0.1, rtol=0.05)


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, including those inside custom_vjp / pjit sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _all_eqns(inner if hasattr(inner, "eqns") else inner.jaxpr)


@pytest.mark.parametrize("temperature,with_entropy", [(0.7, True), (1.0, False)])
def test_chunked_matrix_form_gradients_match_autodiff(temperature, with_entropy):
    """The matrix form's hand-written backward = autodiff of the full computation (temperature too)."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(40, 16)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, size=(2, 9)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, 9)), jnp.float32)

    def loss(h, w, chunked):
        if chunked:
            out = chunked_token_logprobs(h, w, targets, chunk_size=4, temperature=temperature,
                                         return_entropy=with_entropy)
        else:
            out = token_logprobs(jnp.einsum("blh,vh->blv", h, w), targets, temperature=temperature,
                                 return_entropy=with_entropy)
        lp, ent = out if with_entropy else (out, jnp.zeros(()))
        return cross_entropy_loss(lp, weights) + 0.3 * jnp.sum(ent)

    full = jax.grad(loss, argnums=(0, 1))(hidden, unembed, False)
    chunked = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(hidden, unembed, True)
    for a, b in zip(chunked, full):
        np.testing.assert_allclose(a, b, atol=2e-5)
