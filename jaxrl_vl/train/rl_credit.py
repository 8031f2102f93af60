"""Credit assignment of one RL step: group rewards -> per-episode (or per-turn) advantages -> training rows.

    credit = assign_credit(groups, config.rl, image_mean=..., image_std=...)
    credit.rows      # trajectory.training_rows of the kept episodes (advantages on their sampled tokens)
    credit.metrics   # rollout/groups_kept, GiGPO credit statistics

Advantages per group (`rl.advantage`: GRPO, Dr.GRPO, RLOO, REINFORCE++ ...); optionally GiGPO turn-level
credit (`rl.step_advantage_weight`); groups whose rewards are all equal carry no signal and are dropped
(`rl.filter_zero_variance_groups`, DAPO dynamic sampling) unless turn-level credit gives them some;
negative advantages optionally scaled (`rl.negative_advantage_weight`, W-REINFORCE).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxrl_vl.losses import step_advantages
from jaxrl_vl.losses.advantages import compute_advantages, weight_negative, zero_variance_groups
from jaxrl_vl.rollout.trajectory import training_rows


@dataclasses.dataclass
class Credit:
    rows: list[dict]
    kept: list          # the kept trajectories, in row order
    metrics: dict


def turn_level_advantages(groups, episode_advantages, rl) -> tuple[list[list[np.ndarray]], dict]:
    """Per group, per episode, per turn: A_episode + rl.step_advantage_weight * A_step (GiGPO)."""
    out, credited, turns, cluster_sizes = [], 0, 0, []
    for group, row in zip(groups, episode_advantages):
        step = step_advantages.step_advantages([t.turn_states for t in group], [t.turn_rewards for t in group],
                                               rl.step_discount)
        out.append(step_advantages.combine(row, step, rl.step_advantage_weight))
        credited += sum(int(np.count_nonzero(s)) for s in step)
        turns += sum(len(s) for s in step)
        keys = [k for t in group for k in t.turn_states if k is not None]
        cluster_sizes += [keys.count(k) for k in set(keys)]
    return out, {"rollout/step_credited_turns": credited / max(turns, 1),
                 "rollout/step_group_size_mean": float(np.mean(cluster_sizes or [0.0]))}


def assign_credit(groups: list[list], rl, *, image_mean, image_std) -> Credit:
    rewards = np.asarray([[t.reward for t in g] for g in groups], np.float32)
    advantages = np.asarray(compute_advantages(rl.advantage, rewards))
    keep = ~zero_variance_groups(rewards) if rl.filter_zero_variance_groups else np.ones(len(groups), bool)
    per_episode = [list(map(float, row)) for row in advantages]
    metrics: dict = {}
    if rl.step_advantage_weight > 0:  # GiGPO turn-level credit (losses/step_advantages.py)
        per_episode, step_metrics = turn_level_advantages(groups, advantages, rl)
        metrics.update(step_metrics)
        # a group of equal rewards can still hold turn-level credit (e.g. all succeed, some sooner)
        keep = keep | np.asarray([any(np.any(a != 0) for a in g) for g in per_episode])
    per_episode = weight_negative(per_episode, rl.negative_advantage_weight)
    kept = [t for g, k in zip(groups, keep) for t in g if k]
    kept_advantages = [a for a_row, k in zip(per_episode, keep) for a in a_row if k]
    metrics["rollout/groups_kept"] = float(keep.sum())
    rows = training_rows(kept, kept_advantages, image_mean=image_mean, image_std=image_std)
    return Credit(rows=rows, kept=kept, metrics=metrics)
