"""Turn-level credit for multi-turn episodes: GiGPO's step-level groups (Feng et al. 2025,
"Group-in-Group Policy Optimization for LLM Agent Training").

Episode-level advantages (advantages.py) give every turn of an episode the same credit, so a group
of 4 maze episodes that all bump into the same wall before one of them finds the way teaches little
about which move was wrong. The episodes of a group start from the same env state and keep meeting
the same states again (the same cell of the same maze); GiGPO groups every turn of the group by the
env state it acted in (the env's `state_key()`: equal keys = identical situations) and compares the
discounted returns of the actions taken there:

  G_t = sum_{k >= t} gamma^(k - t) r_k                   (per turn, from the episode's turn rewards)
  A_step(t) = (G_t - mean_S) / (std_S + eps)            over the turns S that share t's state key
                                                        (0 for a state seen once, or without a key)
  A(t) = A_episode + weight * A_step(t)                 (rl.step_advantage_weight)

With a success-only reward, gamma < 1 also prefers the shorter way: from a shared cell, the move
that reaches the target in fewer turns gets the larger return.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np

EPS = 1e-6


def discounted_returns(turn_rewards: Sequence[float], gamma: float) -> np.ndarray:
    """[T] rewards -> [T] returns-to-go G_t = sum_k gamma^(k-t) r_k."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"rl.step_discount must be in [0, 1], got {gamma}")
    returns = np.zeros(len(turn_rewards), np.float64)
    running = 0.0
    for t in range(len(turn_rewards) - 1, -1, -1):
        running = float(turn_rewards[t]) + gamma * running
        returns[t] = running
    return returns


def step_advantages(turn_states: Sequence[Sequence[Hashable | None]], turn_rewards: Sequence[Sequence[float]],
                    gamma: float, normalize: bool = True) -> list[np.ndarray]:
    """One group's episodes -> per-episode [T_i] step-level advantages (see module doc).

    turn_states[i][t]: the state key episode i acted in at turn t (None: no key, no step credit);
    turn_rewards[i][t]: its reward for that turn."""
    if len(turn_states) != len(turn_rewards):
        raise ValueError(f"{len(turn_states)} episodes of state keys but {len(turn_rewards)} of rewards")
    returns = [discounted_returns(r, gamma) for r in turn_rewards]
    clusters: dict[Hashable, list[tuple[int, int]]] = defaultdict(list)
    for i, (states, rewards) in enumerate(zip(turn_states, turn_rewards)):
        if len(states) != len(rewards):
            raise ValueError(f"episode {i}: {len(states)} state keys for {len(rewards)} turns")
        for t, key in enumerate(states):
            if key is not None:
                clusters[key].append((i, t))
    out = [np.zeros(len(r), np.float32) for r in turn_rewards]
    for members in clusters.values():
        if len(members) < 2:
            continue
        values = np.asarray([returns[i][t] for i, t in members])
        centered = values - values.mean()
        if normalize:
            centered = centered / (values.std(ddof=1) + EPS)
        for (i, t), advantage in zip(members, centered):
            out[i][t] = advantage
    return out


def combine(episode_advantages: Sequence[float], step: Sequence[np.ndarray], weight: float) -> list[np.ndarray]:
    """Per-turn advantages A_episode + weight * A_step for one group's episodes."""
    return [np.float32(a) + np.float32(weight) * s for a, s in zip(episode_advantages, step)]
