"""The README's main job (`make demo`): for now the digits SFT run of configs/sft_digits.py.

    python launch/train.py --config configs/demo.py

Trains the `small` Qwen3-VL (built offline on first use) on the digits image folder, evaluates
greedy test accuracy (through vLLM when .venv-vllm exists), writes metrics.jsonl, PNG plots,
checkpoints and an HF export under runs/demo, and prints a JSON summary as its last line.
(The RL issue replaces this with SFT on Maze2D demonstrations followed by RL.)
"""
import sft_digits


def get_config():
    c = sft_digits.get_config()
    c.name = "demo"
    return c
