#!/usr/bin/env python
"""Seeded synthetic RL rollouts in the recorded format the RL loop replays (`rl.replay_rollouts_from`).

    python tools/make_replay_rollouts.py --model DIR --out DIR/rollouts --steps 3 --groups 4 --samples 4 \
        --seq-len 4096 --images 4 --image-size 448

Each episode is one training row of `--seq-len` tokens: a prompt with `--images` square images and text, then
`--turns` sampled spans (loss mask 1, rollout logprobs drawn in [-4, -0.05]), rewards that differ within each
group. The shapes of a real multi-image agent episode, for timing the RL update where no vLLM can run (the GPU
benchmark machine) and for multi-process tests; what an episode *says* is random.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _episode(config, rng, *, group: int, sample: int, seed: int, seq_len: int, images: int, image_size: int,
             turns: int):
    from jaxrl_vl.rollout.trajectory import Segment, Trajectory

    vision = config.vision
    side = image_size // vision.patch_size
    tokens_per_image = side * side // vision.spatial_merge_size ** 2
    segment = Segment()
    for _ in range(images):
        segment.extend_prompt(list(rng.integers(10, 200, 8)))
        segment.extend_prompt([config.vision_start_token_id] + [config.image_token_id] * tokens_per_image
                              + [config.vision_end_token_id])
        segment.pixel_chunks.append(rng.integers(0, 256, (side * side, vision.patch_dim), dtype=np.uint8))
        segment.grid_chunks.append(np.array([1, side, side], np.int32))
    left = seq_len - segment.num_tokens
    if left < 2 * turns:
        raise ValueError(f"--seq-len {seq_len} leaves {left} tokens after the images; raise it")
    per_turn = left // turns
    for turn in range(turns):
        prompt = per_turn // 4
        segment.extend_prompt(list(rng.integers(10, 200, prompt)))
        sampled = per_turn - prompt if turn < turns - 1 else left - (turns - 1) * per_turn - prompt
        segment.extend_sampled(list(rng.integers(10, 200, sampled)), list(rng.uniform(-4.0, -0.05, sampled)), turn)
    rewards = [float(rng.uniform()) * (sample + 1) for _ in range(turns)]
    return Trajectory(group_index=group, sample_index=sample, env_seed=seed, segments=[segment],
                      turn_rewards=rewards, weight_versions=[["0"]] * turns, finish_reasons=["stop"] * turns,
                      replies=[""] * turns, messages=[], info={}, end_reason="env_done",
                      turn_states=[None] * turns)


def synthetic_groups(model_dir: str, *, step: int, groups: int, samples: int, seq_len: int, images: int,
                     image_size: int, turns: int = 2, seed: int = 0) -> list[list]:
    """One step's groups [G][n] of synthetic trajectories for the checkpoint in model_dir."""
    from jaxrl_vl.models.config import ModelConfig

    with open(os.path.join(model_dir, "config.json")) as f:
        config = ModelConfig.from_hf_dict(json.load(f))
    rng = np.random.default_rng([seed, step])
    return [[_episode(config, rng, group=g, sample=s, seed=step * 1000 + g, seq_len=seq_len, images=images,
                      image_size=image_size, turns=turns) for s in range(samples)] for g in range(groups)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (its config.json gives the shapes)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from jaxrl_vl.train.rl_rollouts import record_step

    for step in range(1, args.steps + 1):
        record_step(args.out, step, synthetic_groups(args.model, step=step, groups=args.groups, samples=args.samples,
                                                     seq_len=args.seq_len, images=args.images,
                                                     image_size=args.image_size, turns=args.turns, seed=args.seed))
    print(json.dumps({"out": args.out, "steps": args.steps, "episodes_per_step": args.groups * args.samples}))


if __name__ == "__main__":
    main()
