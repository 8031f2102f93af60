#!/usr/bin/env python
"""How much of an RL batch is padding, with one episode per row and with episodes packed into rows.

    python tools/rl_packing_report.py --model MODEL_DIR [--episodes 64] [--row-tokens 2048]
        [--max-segments 8] [--tokens-per-micro-batch 4096]

The batch: Maze2D episodes (9x9, random start and target, one frame per turn, at most --max-turns
turns) played offline by a noisy solver (each turn the shortest path's move with a per-episode
probability in [0.3, 1], else a random action, stop included), rendered with MODEL_DIR's chat template,
tokenizer and image processor (no vLLM), and turned into training rows by trajectory.training_rows
(sampled tokens = the replies). Packing: data/batching.pack_rows (first-fit decreasing); micro-batches
by tokens: data/packing.micro_batch_layout, filler rows counted as padding.
"""
from __future__ import annotations

import argparse

import numpy as np

from jaxrl_vl.data import packing
from jaxrl_vl.data.batching import pack_rows
from jaxrl_vl.data.render import HFRenderer
from jaxrl_vl.envs.base import assistant_message
from jaxrl_vl.envs.maze2d import Maze2DEnv, solve
from jaxrl_vl.envs.maze2d.actions import KEYWORD_TO_ACTION
from jaxrl_vl.envs.maze2d.demos import reply_text
from jaxrl_vl.rollout.trajectory import Segment, Trajectory, training_rows

ACTIONS = list(KEYWORD_TO_ACTION.values())


def play_episode(env: Maze2DEnv, seed: int, rng: np.random.Generator) -> tuple[list[dict], list[float]]:
    """The conversation up to the last reply (what the policy was shown and said) and per-turn rewards."""
    messages, rewards = env.reset(seed), []
    skill = rng.uniform(0.3, 1.0)
    while True:
        plan = solve(env.layout, env.agent)
        action = plan[0] if rng.random() < skill else ACTIONS[rng.integers(len(ACTIONS))]
        reply = reply_text(env, action, moves_left=len(plan) - 1, reasoning=False)
        result = env.step(reply)
        messages.append(assistant_message(reply))
        rewards.append(result.reward)
        if result.done:
            return messages, rewards
        messages += result.messages


def rendered_trajectory(renderer: HFRenderer, messages: list[dict], rewards: list[float], seed: int,
                        rng: np.random.Generator) -> Trajectory:
    """One segment as the agent loop records it: replies sampled (turn k = k-th reply), the rest prompt."""
    example = renderer.render(messages)
    segment, ids, start = Segment(), example.input_ids.tolist(), 0
    for turn, (begin, end) in enumerate(example.assistant_spans.tolist()):
        segment.extend_prompt(ids[start:begin])
        segment.extend_sampled(ids[begin:end], rng.uniform(-2.0, 0.0, end - begin).tolist(), turn)
        start = end
    segment.extend_prompt(ids[start:])
    offsets = np.cumsum([0, *example.image_grid_thw.prod(axis=1)])
    segment.pixel_chunks = [example.pixel_values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    segment.grid_chunks = list(example.image_grid_thw)
    return Trajectory(group_index=seed, sample_index=0, env_seed=seed, segments=[segment], turn_rewards=rewards,
                      weight_versions=[["0"]] * len(rewards), finish_reasons=["stop"] * len(rewards),
                      replies=[], messages=messages, info={}, end_reason="env_done")


def maze_training_rows(model_dir: str, num_episodes: int = 64, *, seed: int = 0, max_turns: int = 9) -> list[dict]:
    """Training rows (trajectory.training_rows) of `num_episodes` offline Maze2D episodes (module docstring)."""
    renderer = HFRenderer.from_pretrained(model_dir)
    env = Maze2DEnv(size=9, cell_px=8, prompt_style="compact", action_format="keyword", max_steps=max_turns,
                    positions="random")
    rng = np.random.default_rng(seed)
    trajectories = [rendered_trajectory(renderer, *play_episode(env, seed + i, rng), seed + i, rng)
                    for i in range(num_episodes)]
    rewards = np.asarray([t.reward for t in trajectories])
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return training_rows(trajectories, advantages.tolist(), image_mean=renderer.image_mean,
                         image_std=renderer.image_std)


def padding_report(rows: list[dict], *, row_tokens: int, max_segments: int, tokens_per_micro_batch: int,
                   length_multiple: int = 256) -> dict:
    """Padding fractions (pad tokens / all tokens) of the layouts the RL step would see."""
    lengths = [len(r["input_ids"]) for r in rows]
    unpacked_length = -(-max(lengths) // length_multiple) * length_multiple  # build_micro_batches' rounding
    packed = pack_rows(rows, row_length=row_tokens, max_segments_per_row=max_segments)
    packed_lengths = [len(r["input_ids"]) for r in packed]
    micro_batches, rows_per_micro_batch = packing.micro_batch_layout(len(packed), row_tokens, tokens_per_micro_batch)
    return {
        "episodes": len(rows), "tokens_min": min(lengths), "tokens_median": int(np.median(lengths)),
        "tokens_max": max(lengths), "tokens_total": sum(lengths),
        "unpacked_row_length": unpacked_length,
        "unpacked_padding": packing.padding_fraction(lengths, unpacked_length),
        "packed_rows": len(packed), "segments_per_row_max": max(int(r["segment_ids"].max()) for r in packed),
        "packed_padding": packing.padding_fraction(packed_lengths, row_tokens),
        "micro_batches": micro_batches, "rows_per_micro_batch": rows_per_micro_batch,
        "filler_rows": micro_batches * rows_per_micro_batch - len(packed),
        "padding": packing.padding_fraction(packed_lengths, row_tokens, micro_batches * rows_per_micro_batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Qwen-VL checkpoint folder (tokenizer, processor)")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--max-turns", type=int, default=9)
    parser.add_argument("--row-tokens", type=int, default=2048)
    parser.add_argument("--max-segments", type=int, default=8)
    parser.add_argument("--tokens-per-micro-batch", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = maze_training_rows(args.model, args.episodes, seed=args.seed, max_turns=args.max_turns)
    r = padding_report(rows, row_tokens=args.row_tokens, max_segments=args.max_segments,
                       tokens_per_micro_batch=args.tokens_per_micro_batch)
    print(f"{r['episodes']} Maze2D episodes: {r['tokens_min']}-{r['tokens_max']} tokens (median "
          f"{r['tokens_median']}), {r['tokens_total']} in all")
    print(f"one episode per row, {r['episodes']} rows x {r['unpacked_row_length']}: "
          f"padding {r['unpacked_padding']:.1%} of tokens")
    print(f"packed (first-fit decreasing, rows of {args.row_tokens}, <= {args.max_segments} episodes): "
          f"{r['packed_rows']} rows, up to {r['segments_per_row_max']} episodes each, "
          f"padding {r['packed_padding']:.1%}")
    print(f"micro-batches of {args.tokens_per_micro_batch} tokens: {r['micro_batches']} x {r['rows_per_micro_batch']} "
          f"rows ({r['filler_rows']} filler): padding {r['padding']:.1%} of tokens")


if __name__ == "__main__":
    main()
