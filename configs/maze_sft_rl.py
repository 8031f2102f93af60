"""The main job on Maze2D: solver demonstrations -> SFT of the `small` Qwen3-VL -> RL (CPU).

    python launch/train.py --config configs/maze_sft_rl.py [--config.rl.train.num_steps=...]

Stages and resume: jaxrl_vl/train/pipeline.py. `config.maze` sets the env for both the
demonstrations and RL; `config.sft` and `config.rl` are full SFT / RL configs (configs/base.py,
configs/rl_base.py), so e.g. `--config.sft.train.num_steps=200 --config.rl.loss.name=cispo` work.
The last printed line is the JSON summary with success_before_rl / success_after_rl on the same
held-out seeds, eval_episodes, rl_steps, max_drift, wall_seconds and run_dir.
"""
import ml_collections

import base
import rl_maze


def get_config():
    c = ml_collections.ConfigDict()
    c.trainer = "sft_then_rl"
    c.name = "maze_sft_rl"
    c.run_dir = ""
    c.seed = 0
    c.distributed = "off"

    c.maze = ml_collections.ConfigDict()
    # A 5x5 grid (2x2 rooms) with random start and target cells: episodes of 1-7 turns that the
    # 6M-parameter model learns on 2 CPU cores in minutes. VisGym's easy maze is size 9, corners.
    c.maze.size = 5                 # odd >= 5
    c.maze.positions = "random"     # "corners" (VisGym) | "random" floor cells
    c.maze.max_steps = 8            # step cap (in the prompt); 0 = the env default (20 for small grids)
    c.maze.cell_px = 32             # 32 px cells: one 32x32 merged vision token per cell
    c.maze.action_format = "keyword"
    c.maze.prompt_style = "compact"
    c.maze.include_feedback = False   # no "Environment feedback: ..." line: ~27 fewer tokens per turn
    c.maze.num_demos = 400          # solver demonstrations (one multi-turn record each)
    c.maze.num_test_demos = 32      # demonstrations on held-out seeds (SFT eval NLL)
    c.maze.demo_seed = 0

    c.sft = sft = base.get_config()
    sft.name = "maze_sft"
    sft.model.path = "artifacts/models/qwen3_vl_small"
    sft.model.build_size = "small"
    sft.model.random_init = True
    sft.data.loss_on = "all"        # every assistant turn of a demonstration is a target
    sft.data.max_length = 1024      # a 5x5 episode (<= 8 turns, 25 image tokens per frame) fits
    sft.train.num_steps = 300       # the loss drops off its plateau around step 150
    sft.train.batch_size = 8
    sft.train.grad_accum_steps = 1
    sft.optim.learning_rate = 2e-3
    sft.optim.warmup_steps = 20
    sft.optim.weight_decay = 0.0
    sft.checkpoint.every_steps = 100
    sft.eval.every_steps = 100
    sft.eval.nll_num_examples = 32
    sft.eval.num_generation_examples = 0  # success is measured by RL's held-out episodes instead

    c.rl = rl = rl_maze.get_config()
    rl.name = "maze_rl"
    rl.rl.num_groups = 8
    rl.rl.samples_per_group = 8     # 8 episodes per layout: more turns share a cell (step-level groups below)
    rl.train.grad_accum_steps = 2   # 2 micro-batches of 32 episodes: ~8 GB RSS on CPU
    rl.train.num_steps = 24
    # GiGPO turn-level credit: turns taken in the same cell of the same maze are compared by their discounted
    # return, so a wall bump is told apart from the move that led to the target (losses/step_advantages.py).
    rl.rl.step_advantage_weight = 1.0
    rl.rl.step_discount = 0.95
    # Dense signal (potential-based shaping, envs/maze2d/env.py): +0.1 per move closer to the target, -0.1 per
    # move away, 0 for a wall bump (65% of this SFT policy's moves); held-out episodes keep the sparse reward.
    # Same SFT policy, 512 held-out episodes: 24 steps with it 0.369 -> 0.412; 12 steps without it: within noise.
    rl.rl.env_kwargs.progress_reward = 0.1
    rl.rl.eval_env_kwargs.progress_reward = 0.0
    # On this model (same SFT policy, 12-16 steps): lr 1e-4 left held-out success flat, 4e-4 gave +0.016,
    # 5e-4 (with or without warmup) declined and 1e-3 collapsed within 2 steps.
    rl.optim.learning_rate = 4e-4
    # Each episode weighs the same: with token-mean the long failed episodes (8 turns) dominate.
    rl.loss.aggregation = "sequence-mean"
    # Held-out success is measured on the sampling policy RL trains (temperature 1), 16 episodes per seed
    # (512 in all, the same seeds and sampling seeds before and after RL). Greedy decoding of this small
    # policy mostly fails by repeating a move into a wall: the frame does not change, so neither does the argmax.
    rl.rl.eval_episodes = 32
    rl.rl.eval_samples_per_seed = 16  # 512 episodes: one standard error ~0.02
    rl.rl.eval_temperature = 1.0
    rl.rl.max_sequence_tokens = 1024
    rl.rl.length_multiple = 64      # episodes are 70-530 tokens: rows padded to 576, not 768 (train step 21 -> 17 s)
    rl.vllm.cpu_cores = "all"       # the trainer waits during rollouts: vLLM's model gets both cores (rollouts -28%)
    rl.vllm.max_model_len = 1024
    return c
