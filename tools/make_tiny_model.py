#!/usr/bin/env python
"""Builds a Hugging Face-format Qwen-VL checkpoint with random weights, offline and deterministically.

    python tools/make_tiny_model.py --arch qwen3_vl --size tiny --out /tmp/qwen3_vl_tiny
    python tools/make_tiny_model.py --like qwen3_vl_2b --out /tmp/qwen3_vl_2b_random

The builder is jaxrl_vl/models/tiny_checkpoint.py (sizes, `--like` shapes, what is written).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxrl_vl.models.tiny_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    main()
