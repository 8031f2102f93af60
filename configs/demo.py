"""The README's main job (`make demo`): SFT of the `small` Qwen3-VL on Maze2D solver demonstrations,
then RL on Maze2D, on CPU (configs/maze_sft_rl.py).

    python launch/train.py --config configs/demo.py

Builds the `small` checkpoint offline on first use, writes the demonstrations, trains, starts a CPU
vLLM server for RL, and prints held-out success before and after RL (same seeds); the last line is
the JSON summary. Everything lands under runs/demo (metrics.jsonl, PNG plots, checkpoints, exports).
The digits SFT run that used to be the demo is configs/sft_digits.py.
"""
import maze_sft_rl


def get_config():
    c = maze_sft_rl.get_config()
    c.name = "demo"
    return c
