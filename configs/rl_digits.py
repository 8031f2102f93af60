"""RL on single-turn digit classification (reward 1 for the right name) from the SFT digits model.

    python launch/train.py --config configs/rl_digits.py [--config.model.path=SFT_EXPORT]
"""
import rl_base


def get_config():
    c = rl_base.get_config()
    c.name = "rl_digits"
    c.model.path = "runs/sft_digits/export"
    c.rl.env = "digits"
    c.rl.env_kwargs.split = "train"
    c.rl.eval_env_kwargs.split = "test"
    c.rl.num_groups = 8
    c.rl.samples_per_group = 4
    c.rl.max_tokens_per_turn = 16
    c.rl.max_sequence_tokens = 512
    c.rl.eval_episodes = 64
    c.vllm.max_images_per_prompt = 1
    c.train.num_steps = 20
    c.optim.learning_rate = 2e-5
    return c
