"""Rollout correction (losses/rollout_correction.py): importance weights, rejection masks and drift
metrics checked against numpy by hand, on unpacked and packed rows; the config check; and how the
weights and the rejection enter compute_policy_loss."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vl.losses import rollout_correction as rc
from jaxrl_vl.losses.policy import PolicyLossConfig, compute_policy_loss

# Two rows of 6 tokens. Row 0 is packed: segment 1 = tokens 0-2, segment 2 = tokens 3-4, token 5 padding.
# Row 1 is one sequence (segment 1) of tokens 0-4 and padding at 5. Loss tokens as in MASK.
MASK = np.array([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], np.float32)
SEGMENTS = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]], np.int32)
TURNS = np.array([[-1, 0, 0, 0, 1, -1], [-1, 0, 1, 1, -1, -1]], np.int32)
LOG_RHO = np.array([[9.0, 0.1, 1.2, -0.3, 0.05, 7.0], [5.0, -1.5, 0.0, 0.4, 3.0, 0.0]], np.float32)
ROLLOUT = np.full_like(LOG_RHO, -1.0)
OLD = ROLLOUT + LOG_RHO
SEQUENCES = [(0, [1, 2]), (0, [3, 4]), (1, [1, 2, 3])]  # (row, loss tokens) of each sequence


def _compute(config, **kwargs):
    kwargs.setdefault("segment_ids", SEGMENTS)
    kwargs.setdefault("max_segments_per_row", 2)
    return rc.compute_rollout_correction(config, jnp.asarray(OLD), jnp.asarray(ROLLOUT), jnp.asarray(MASK), **kwargs)


def _per_sequence(reduce):
    """numpy: each loss token gets reduce(its sequence's log rho over loss tokens)."""
    out = np.zeros_like(LOG_RHO)
    for row, tokens in SEQUENCES:
        out[row, tokens] = reduce(LOG_RHO[row, tokens])
    return out


def test_token_sequence_and_geometric_importance_weights():
    for level, level_log_rho in (("token", LOG_RHO), ("sequence", _per_sequence(np.sum)),
                                 ("geometric", _per_sequence(np.mean))):
        weights, mask, metrics = _compute(rc.RolloutCorrectionConfig(rollout_is=level, rollout_is_threshold=2.0))
        expected = np.minimum(np.exp(level_log_rho), 2.0) * MASK
        np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-6, err_msg=level)
        np.testing.assert_array_equal(np.asarray(mask), MASK)  # no rejection configured
        on = MASK != 0
        assert float(metrics["rollout_is_mean"]) == pytest.approx(expected[on].mean(), rel=1e-6)
        assert float(metrics["rollout_is_max"]) == pytest.approx(expected[on].max(), rel=1e-6)
        assert float(metrics["rollout_is_ratio_fraction_high"]) == pytest.approx(
            np.mean(level_log_rho[on] > math.log(2.0)))
        normalized = expected[on] / expected[on].mean()
        assert float(metrics["rollout_is_eff_sample_size"]) == pytest.approx(1 / np.mean(normalized ** 2), rel=1e-5)
    # sequence level without segment_ids: each row is one sequence (row 0's two segments merge)
    weights, _, _ = _compute(rc.RolloutCorrectionConfig(rollout_is="sequence", rollout_is_threshold=10.0),
                             segment_ids=None, max_segments_per_row=1)
    row_sums = (LOG_RHO * MASK).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(weights), np.minimum(np.exp(row_sums), 10.0) * MASK, rtol=1e-6)


def test_rejection_masks_tokens_or_whole_sequences():
    config = rc.RolloutCorrectionConfig(rollout_rs="token", rollout_rs_threshold=2.0)  # keep [0.5, 2]
    weights, mask, metrics = _compute(config)
    keep_token = (np.abs(LOG_RHO) <= math.log(2.0)) * MASK
    np.testing.assert_array_equal(np.asarray(mask), keep_token)
    np.testing.assert_array_equal(np.asarray(weights), MASK)  # no IS configured: weight 1 on loss tokens
    rejected = MASK - keep_token  # tokens (0, 2) and (1, 1)
    assert float(metrics["rollout_rs_masked_fraction"]) == pytest.approx(rejected.sum() / MASK.sum())
    assert float(metrics["rollout_rs_seq_masked_fraction"]) == pytest.approx(2 / 3)

    # sequence level: segment (0, [1, 2]) has sum 1.3 > log 3.5 and is dropped whole; (0, [3, 4]) -0.25 and
    # row 1's -1.1 stay inside [1/3.5, 3.5]
    _, mask, metrics = _compute(rc.RolloutCorrectionConfig(rollout_rs="sequence", rollout_rs_threshold=3.5))
    expected = MASK.copy()
    expected[0, [1, 2]] = 0
    np.testing.assert_array_equal(np.asarray(mask), expected)
    assert float(metrics["rollout_rs_seq_masked_fraction"]) == pytest.approx(1 / 3)
    # geometric with an explicit lower bound: means 0.65, -0.125, -0.367; keep [exp(-0.2), exp(0.7)]
    config = rc.RolloutCorrectionConfig(rollout_rs="geometric", rollout_rs_threshold=math.exp(0.7),
                                        rollout_rs_threshold_lower=math.exp(-0.2))
    _, mask, _ = _compute(config)
    expected = MASK.copy()
    expected[1, [1, 2, 3]] = 0
    np.testing.assert_array_equal(np.asarray(mask), expected)


def test_drift_metrics_by_hand_and_per_turn():
    _, _, metrics = _compute(rc.RolloutCorrectionConfig(rollout_rs="token", rollout_rs_threshold=2.0),
                             turn_ids=TURNS, max_turns_logged=3)
    on = MASK != 0
    rho = np.exp(LOG_RHO)
    assert float(metrics["kl"]) == pytest.approx(np.mean(-LOG_RHO[on]), abs=1e-6)  # fp32: old - rollout
    assert float(metrics["k3_kl"]) == pytest.approx(np.mean(rho[on] - 1 - LOG_RHO[on]), rel=1e-6)
    assert float(metrics["ratio_min"]) == pytest.approx(rho[on].min(), rel=1e-6)
    assert float(metrics["ratio_max"]) == pytest.approx(rho[on].max(), rel=1e-6)
    assert float(metrics["ratio_mean"]) == pytest.approx(rho[on].mean(), rel=1e-6)
    for q in rc.RATIO_PERCENTILES:
        assert float(metrics[f"ratio_p{q}"]) == pytest.approx(np.percentile(rho[on], q), rel=1e-5), q
    assert float(metrics["abs_log_ratio_max"]) == pytest.approx(1.5)
    rejected = on & (np.abs(LOG_RHO) > math.log(2.0))
    for k in range(3):
        in_turn = on & (TURNS == k)
        assert float(metrics[f"tokens_turn_{k}"]) == in_turn.sum()
        if in_turn.any():
            assert float(metrics[f"kl_turn_{k}"]) == pytest.approx(np.mean(-LOG_RHO[in_turn]), abs=1e-6)
            assert float(metrics[f"ratio_mean_turn_{k}"]) == pytest.approx(rho[in_turn].mean(), rel=1e-6)
            assert float(metrics[f"rollout_rs_masked_fraction_turn_{k}"]) == pytest.approx(rejected[in_turn].mean())
    assert float(metrics["kl_turn_2"]) == 0.0 and float(metrics["tokens_turn_2"]) == 0.0
    # on-policy (old == rollout): every drift is exactly zero, nothing rejected
    _, mask, metrics = rc.compute_rollout_correction(
        rc.RolloutCorrectionConfig(rollout_rs="token", rollout_rs_threshold=1.0), jnp.asarray(ROLLOUT),
        jnp.asarray(ROLLOUT), jnp.asarray(MASK))
    assert float(metrics["kl"]) == 0.0 and float(metrics["k3_kl"]) == 0.0 and float(metrics["ratio_p99"]) == 1.0
    np.testing.assert_array_equal(np.asarray(mask), MASK)


def test_leading_micro_batch_axes_and_jit():
    config = rc.RolloutCorrectionConfig(rollout_is="geometric", rollout_rs="sequence", rollout_rs_threshold=3.0)
    stacked = [np.stack([x, x[::-1]]) for x in (OLD, ROLLOUT, MASK, SEGMENTS)]  # [A=2, B=2, L]
    run = jax.jit(lambda o, r, m, s: rc.compute_rollout_correction(config, o, r, m, segment_ids=s,
                                                                   max_segments_per_row=2))
    weights, mask, metrics = run(*stacked)
    assert weights.shape == mask.shape == (2, 2, 6)
    flat = rc.compute_rollout_correction(config, *(x.reshape(4, 6) for x in stacked[:3]),
                                         segment_ids=stacked[3].reshape(4, 6), max_segments_per_row=2)
    np.testing.assert_allclose(np.asarray(weights).reshape(4, 6), np.asarray(flat[0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask).reshape(4, 6), np.asarray(flat[1]))
    assert float(metrics["k3_kl"]) == pytest.approx(float(flat[2]["k3_kl"]), rel=1e-6)


def test_weights_and_rejection_change_the_policy_loss_as_stated():
    """loss = aggregate(sg(w) * loss_t, loss_mask * keep): importance_sampling loss -r*A, r = 1 here."""
    config = rc.RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="token",
                                        rollout_rs_threshold=3.0)
    weights, kept, _ = _compute(config)
    logprobs = jnp.asarray(OLD)  # pi_theta = pi_old: ratio 1
    advantages = jnp.asarray(MASK * 0.5)
    for aggregation in ("token-mean", "sum"):
        loss_config = PolicyLossConfig(name="importance_sampling", aggregation=aggregation)
        loss, _ = compute_policy_loss(loss_config, logprobs, jnp.asarray(OLD), advantages, kept,
                                      rollout_is_weights=weights)
        w, k = np.asarray(weights), np.asarray(kept)
        total = np.sum(-0.5 * w * k)
        assert float(loss) == pytest.approx(total / (k.sum() if aggregation == "token-mean" else 1.0), rel=1e-6)
        assert k.sum() < MASK.sum()  # token (1, 1) (rho = e^-1.5) was rejected


def test_tis_cap_equals_token_rollout_is_weights():
    loss_config = PolicyLossConfig(name="ppo", aggregation="sequence-mean", max_segments_per_row=2)
    tis_config = PolicyLossConfig(name="ppo", aggregation="sequence-mean", max_segments_per_row=2, tis_cap=2.0)
    weights, _, _ = _compute(rc.RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=2.0))
    advantages = jnp.asarray(MASK * np.array([[1.0], [-1.0]], np.float32))
    old, rollout, mask, segments = map(jnp.asarray, (OLD, ROLLOUT, MASK, SEGMENTS))

    def loss(lp, cfg, **kw):
        return compute_policy_loss(cfg, lp, old, advantages, mask, segment_ids=segments, **kw)[0]

    lp = old + 0.1
    by_weights = jax.value_and_grad(loss)(lp, loss_config, rollout_is_weights=weights)
    by_cap = jax.value_and_grad(loss)(lp, tis_config, rollout_logprobs=rollout)
    assert float(by_cap[0]) == pytest.approx(float(by_weights[0]), rel=1e-6)
    np.testing.assert_allclose(np.asarray(by_cap[1]), np.asarray(by_weights[1]), rtol=1e-6)
    with pytest.raises(ValueError, match="both weight the loss"):
        compute_policy_loss(tis_config, lp, old, advantages, mask, rollout_logprobs=rollout,
                            rollout_is_weights=weights)


@pytest.mark.parametrize("kwargs,match", [
    (dict(old_logprobs="rollout", tis_cap=2.0), "loss.tis_cap=2.0 with loss.old_logprobs='rollout'"),
    (dict(correction=rc.RolloutCorrectionConfig(rollout_is="token"), old_logprobs="rollout"),
     "rollout_correction.rollout_is='token' with loss.old_logprobs='rollout'"),
    (dict(correction=rc.RolloutCorrectionConfig(rollout_rs="token", rollout_rs_threshold=2.0),
          old_logprobs="rollout"), "rollout_correction.rollout_rs"),
    (dict(correction=rc.RolloutCorrectionConfig(rollout_is="token"), tis_cap=2.0), "keep one"),
    (dict(temperature=0.7), "vllm.logprobs_mode='processed_logprobs'"),
    (dict(top_p=0.9, logprobs_mode="processed_logprobs"), "rl.top_p=0.9"),
    (dict(top_k=20), "rl.top_k=20"),
    (dict(temperature=0.0), "rl.temperature=0.0"),
    (dict(old_logprobs="behaviour"), "loss.old_logprobs='behaviour'"),
])
def test_config_check_names_the_keys(kwargs, match):
    kwargs = {"correction": rc.RolloutCorrectionConfig(), "old_logprobs": "trainer", **kwargs}
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        rc.check_config(kwargs.pop("correction"), **kwargs)


def test_valid_configs_pass_and_bad_fields_are_named():
    rc.check_config(rc.RolloutCorrectionConfig(), old_logprobs="rollout")  # the default: nothing to correct
    rc.check_config(rc.RolloutCorrectionConfig(rollout_is="sequence", rollout_is_threshold=5.0),
                    old_logprobs="trainer", temperature=0.7, logprobs_mode="processed_logprobs")
    for fields, match in ((dict(rollout_is="seq"), "rollout_correction.rollout_is='seq'"),
                          (dict(rollout_is_threshold=0.5), "rollout_is_threshold=0.5"),
                          (dict(rollout_rs="token"), "needs rollout_rs_threshold"),
                          (dict(rollout_rs="token", rollout_rs_threshold=0.9), "0 < lower <= 1 <= upper"),
                          (dict(rollout_rs="token", rollout_rs_threshold=2.0, rollout_rs_threshold_lower=1.5),
                           "rollout_rs_threshold_lower=1.5")):
        with pytest.raises(ValueError, match=match):
            rc.RolloutCorrectionConfig(**fields)
