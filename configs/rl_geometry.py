"""RL on procedural geometry problems with the `calc_score` tool (multi-turn, 3 turns by default).

    python launch/train.py --config configs/rl_geometry.py [--config.model.path=MODEL]
    # a Geometry3k-format dataset instead of the offline generator:
    #   --config.rl.env_kwargs.data_path=DIR

Each turn the model may call calc_score (feedback comes back as a tool message; tool errors are
observations, never crashes) or give a final \\boxed{} answer. Per-turn rewards are logged
(rollout/reward_mean sums them per episode; samples keep turn_rewards).
"""
import rl_base


def get_config():
    c = rl_base.get_config()
    c.name = "rl_geometry"
    c.model.path = "runs/sft_geometry/export"
    c.rl.env = "geometry"
    c.rl.env_kwargs.split = "train"
    c.rl.env_kwargs.max_turns = 3
    c.rl.env_kwargs.generator_seed = 0
    c.rl.eval_env_kwargs.split = "test"
    c.rl.eval_env_kwargs.generator_seed = 1
    c.rl.num_groups = 8
    c.rl.samples_per_group = 4
    c.rl.max_tokens_per_turn = 128
    c.rl.max_sequence_tokens = 2048
    c.rl.eval_episodes = 32
    c.vllm.max_images_per_prompt = 2
    return c
