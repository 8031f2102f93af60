"""A fixed held-out evaluation set of Maze2D seeds and an evaluator that reports success rate.

Evaluation seeds live far from training seeds (training tools use small seeds and also drop any
layout that equals an evaluation layout), so the same `n` and `size` always give the same mazes.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from jaxrl_vl.envs.base import Episode, Policy, run_episode
from jaxrl_vl.envs.maze2d.generate import random_layout

EVAL_SEED_OFFSET = 1_000_000_000
DEFAULT_EVAL_EPISODES = 64  # SkyRL's VisGym eval uses seeds 0..63; VisGym's paper uses 70


def eval_seeds(n: int = DEFAULT_EVAL_EPISODES) -> list[int]:
    return [EVAL_SEED_OFFSET + i for i in range(n)]


@functools.lru_cache(maxsize=16)
def eval_layout_keys(size: int, n: int = DEFAULT_EVAL_EPISODES, positions: str = "corners") -> frozenset[bytes]:
    """Identities of the held-out layouts, to keep them out of training data."""
    return frozenset(random_layout(size, s, positions).key() for s in eval_seeds(n))


def summarize(episodes: list[Episode]) -> dict[str, Any]:
    """Success rate and episode stats. Every field is a plain float/int (JSON ready)."""
    n = len(episodes)
    if n == 0:
        raise ValueError("no episodes to summarize")
    successes = [bool(e.info.get("success")) for e in episodes]
    turns = [len(e.rewards) for e in episodes]
    # Mazes whose shortest path plus the stop does not fit in the step cap cannot be solved.
    solvable = [e.info.get("optimal_moves") is not None and e.info["optimal_moves"] + 1 <= e.info["max_steps"] for e in episodes]
    solved_solvable = sum(s for s, ok in zip(successes, solvable) if ok)
    return {
        "episodes": n,
        "success_rate": sum(successes) / n,
        "mean_turns": sum(turns) / n,
        "mean_reward": sum(e.total_reward for e in episodes) / n,
        "solvable_fraction": sum(solvable) / n,
        "success_rate_on_solvable": solved_solvable / max(1, sum(solvable)),
    }


async def evaluate(
    policy: Policy,
    env_factory,
    n_episodes: int = DEFAULT_EVAL_EPISODES,
    concurrency: int = 16,
) -> tuple[dict[str, Any], list[Episode]]:
    """Play the held-out seeds with `policy` (async messages -> reply text).

    `env_factory()` builds one fresh env per episode (e.g. `lambda: Maze2DEnv(size=9)` or
    `functools.partial(make_env, "maze2d", size=9)`). Returns (summary, episodes in seed order).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    gate = asyncio.Semaphore(concurrency)

    async def one(seed: int) -> Episode:
        async with gate:
            return await run_episode(env_factory(), policy, seed)

    episodes = list(await asyncio.gather(*(one(s) for s in eval_seeds(n_episodes))))
    return summarize(episodes), episodes

