"""GiGPO turn-level credit (losses/step_advantages.py) and its use in training rows."""
import numpy as np
import pytest

from jaxrl_vl.envs.maze2d import Maze2DEnv
from jaxrl_vl.losses.step_advantages import combine, discounted_returns, step_advantages
from jaxrl_vl.rollout.trajectory import Segment, Trajectory, training_rows


def test_discounted_returns():
    np.testing.assert_allclose(discounted_returns([0, 0, 1], 0.5), [0.25, 0.5, 1.0])
    np.testing.assert_allclose(discounted_returns([1, 0, 1], 1.0), [2, 1, 1])
    with pytest.raises(ValueError, match="step_discount"):
        discounted_returns([1], 1.5)


def test_step_groups_compare_actions_taken_in_the_same_state():
    # Two episodes from state "s0": A goes to "a" then succeeds, B bumps (stays in s0) twice then fails.
    states = [["s0", "a"], ["s0", "s0", "s0"]]
    rewards = [[0.0, 1.0], [0.0, 0.0, 0.0]]
    out = step_advantages(states, rewards, gamma=0.9)
    # cluster s0: returns [0.9 (A), 0, 0, 0 (B's three turns)] -> A positive, B's turns negative
    assert out[0][0] > 0 and all(x < 0 for x in out[1])
    assert out[0][1] == 0.0  # state "a" seen once: no step-level credit
    np.testing.assert_allclose(sum(out[0][:1]) + sum(out[1]), 0.0, atol=1e-5)  # centred within the cluster
    # turns without a key get nothing; equal returns give zero
    assert all(np.all(a == 0) for a in step_advantages([[None, None]], [[0.0, 1.0]], 0.9))
    assert all(np.all(a == 0) for a in step_advantages([["x"], ["x"]], [[1.0], [1.0]], 0.9))
    combined = combine([0.5, -0.5], out[:1] + out[1:], weight=2.0)
    np.testing.assert_allclose(combined[1], -0.5 + 2.0 * out[1])


def _trajectory(turn_ids, num_turns):
    segment = Segment()
    segment.extend_prompt([1, 2])
    for turn in range(num_turns):
        segment.extend_sampled([10 + turn, 20 + turn], [-0.1, -0.2], turn)
        segment.extend_prompt([3])
    return Trajectory(group_index=0, sample_index=0, env_seed=0, segments=[segment], turn_rewards=[0.0] * num_turns,
                      weight_versions=[["0"]] * num_turns, finish_reasons=["stop"] * num_turns, replies=[""] * num_turns,
                      messages=[], info={}, end_reason="env_done")


def test_training_rows_spread_per_turn_advantages_over_their_tokens():
    trajectory = _trajectory(None, 3)
    (row,) = training_rows([trajectory], [np.asarray([1.0, -2.0, 0.5])], image_mean=[0.5] * 3, image_std=[0.5] * 3)
    sampled = row["loss_mask"] > 0
    np.testing.assert_allclose(row["advantages"][sampled], [1.0, 1.0, -2.0, -2.0, 0.5, 0.5])
    assert np.all(row["advantages"][~sampled] == 0)
    (row,) = training_rows([trajectory], [0.7], image_mean=[0.5] * 3, image_std=[0.5] * 3)
    np.testing.assert_allclose(row["advantages"][row["loss_mask"] > 0], 0.7)
    with pytest.raises(ValueError, match="2 turn advantages for 3 turns"):
        training_rows([trajectory], [np.asarray([1.0, 2.0])], image_mean=[0.5] * 3, image_std=[0.5] * 3)


def test_maze_state_key_follows_the_agent():
    env = Maze2DEnv(size=5, positions="random", action_format="keyword", prompt_style="compact", max_steps=8)
    env.reset(seed=3)
    start = env.state_key()
    assert start == env.state_key()  # pure
    bumped = None
    for move in ("left", "right", "up", "down"):
        env.reset(seed=3)
        env.step(f"<action>{move}</action>")
        if env.state_key() == start:
            bumped = move  # a wall: same situation as before the move
        else:
            assert env.state_key()[1] != start[1]
    assert bumped is not None  # a 5x5 maze cell always has a wall on some side


def test_weight_negative_scales_only_negative_advantages():
    from jaxrl_vl.losses.advantages import weight_negative

    per_episode = [[1.0, -2.0], [np.array([0.5, -1.0, 0.0])]]
    out = weight_negative(per_episode, 0.1)
    assert out[0] == [1.0, pytest.approx(-0.2)]
    np.testing.assert_allclose(out[1][0], [0.5, -0.1, 0.0])
    assert weight_negative(per_episode, 1.0) is per_episode
    assert weight_negative(per_episode, 0.0)[0] == [1.0, 0.0]
    with pytest.raises(ValueError, match="negative_advantage_weight"):
        weight_negative(per_episode, 1.5)
