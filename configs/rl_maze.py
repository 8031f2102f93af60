"""RL on Maze2D (VisGym rules, one frame per turn, every frame kept in context) from an SFT model.

    python launch/train.py --config configs/rl_maze.py [--config.model.path=SFT_EXPORT]

Starts a CPU vLLM server on model.path unless --config.vllm.url is given. The env settings must
match the SFT data the model was trained on, e.g. demonstrations from
`tools/make_sft_data.py --env maze2d --size 9 --cell-px 16 --action-format keyword
--prompt-style compact` (the env's default step cap, 20 on 9x9, appears in the prompt, so keep it).
"""
import rl_base


def get_config():
    c = rl_base.get_config()
    c.name = "rl_maze"
    c.model.path = "runs/sft_maze/export"
    c.rl.env = "maze2d"
    c.rl.env_kwargs.size = 9
    c.rl.env_kwargs.cell_px = 16
    c.rl.env_kwargs.prompt_style = "compact"
    c.rl.env_kwargs.action_format = "keyword"
    c.rl.env_kwargs.max_steps = 20  # the 9x9 default, as in the SFT prompts ("allowed to take N more steps")
    c.rl.num_groups = 8
    c.rl.samples_per_group = 4
    c.rl.max_tokens_per_turn = 16
    c.rl.max_sequence_tokens = 2048
    c.rl.eval_episodes = 32
    c.rl.eval_seed_offset = 1_000_000_000  # maze2d.evaluate.EVAL_SEED_OFFSET: the held-out layouts SFT data avoids
    c.rl.train_seed_offset = 500_000       # mazes unlike the SFT demonstrations' (seeds 0, 1, ...)
    c.vllm.max_images_per_prompt = 20  # = the env's step cap: every frame stays in context
    c.train.num_steps = 20
    c.optim.learning_rate = 2e-5
    return c
