"""SFT of the `small` Qwen3-VL model from scratch on the digits image folder (CPU, < 20 minutes).

    python launch/train.py --config configs/sft_digits.py [--config.run_dir=DIR]

The digits (scikit-learn's 8x8 digits upsampled to RGB) are asked "What is the name of the
subject in this photo?" and answered "The subject in this photo is: <name>". Success: >= 90%
greedy accuracy on the test split.
"""
import base


def get_config():
    c = base.get_config()
    c.name = "sft_digits"
    c.model.path = "artifacts/models/qwen3_vl_small"
    c.model.build_size = "small"
    c.model.random_init = True
    c.data.source = "digits"
    c.data.path = "artifacts/data/digits"
    c.data.max_length = 128
    c.train.num_steps = 300
    c.train.batch_size = 16
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 100
    c.eval.every_steps = 100
    c.eval.nll_num_examples = 64
    c.eval.num_generation_examples = 200
    c.eval.max_new_tokens = 16
    return c
