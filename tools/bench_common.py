"""Shared, numpy-only pieces of the training benchmark (tools/bench_train.py, tools/bench_torch.py).

No jax and no torch here, so the PyTorch reference process never initialises JAX's GPU client and
the JAX process never loads torch.
  hf_config_dict(like)           the transformers config.json dict of a `--like` model (real shapes)
  build_rows(...)                a seeded synthetic batch: rows of seq_len tokens with images
  train_flops_breakdown(...)     the FLOPs of one step, text decoder + vision tower, from shapes
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TOOLS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS_DIR))
sys.path.insert(0, str(TOOLS_DIR.parent))
from jaxrl_vl.models import tiny_checkpoint as mtm  # noqa: E402  (numpy + the tokenizer builder only)
from jaxrl_vl.models.tiny_tokenizer import QWEN_ADDED_TOKENS, QWEN_BASE_VOCAB_SIZE  # noqa: E402

# CPU-sized shapes for developing the benchmark: make_tiny_model's tiny/small qwen3_vl shapes.
TINY_LIKES = {"tiny": "tiny", "small": "small"}
TINY_BASE_VOCAB = 1000  # BPE entries before the added tokens of the CPU-sized configs


def like_choices() -> list[str]:
    return sorted(mtm.LIKE) + sorted(TINY_LIKES)


def hf_config_dict(like: str) -> dict:
    """config.json dict of the `--like` model (tiny_checkpoint's shapes, no weights written)."""
    if like in mtm.LIKE:
        spec = dict(mtm.LIKE[like], real=True)
        arch, vocab, tie = spec["arch"], spec["vocab"], spec["tie"]
        ids = mtm.token_ids(QWEN_BASE_VOCAB_SIZE)
        max_positions = 262144 if arch == "qwen3_vl" else 128000
    elif like in TINY_LIKES:
        spec = dict(mtm.SIZES[TINY_LIKES[like]], window=56)
        arch, tie, max_positions = "qwen3_vl", False, 32768
        ids = mtm.token_ids(TINY_BASE_VOCAB)
        vocab = -(-(TINY_BASE_VOCAB + len(QWEN_ADDED_TOKENS)) // 64) * 64
    else:
        raise ValueError(f"--like {like!r}: expected one of {like_choices()}")
    make_config = mtm.qwen3_vl_config if arch == "qwen3_vl" else mtm.qwen2_5_vl_config
    return make_config(spec, ids, vocab, tie, max_positions)


def text_token_range(like: str) -> int:
    """Ordinary text ids are drawn from [0, this): below every special token."""
    return QWEN_BASE_VOCAB_SIZE if like in mtm.LIKE else TINY_BASE_VOCAB


def build_rows(config, like: str, batch_size: int, seq_len: int, images_per_row: int, image_size: int,
               seed: int = 0) -> list[dict]:
    """`batch_size` rows of exactly `seq_len` tokens, each holding `images_per_row` square images of
    `image_size` pixels (random normalised patches), laid out as Qwen chat rows do:
    text, <|vision_start|>, image tokens, <|vision_end|>, text, ... . loss_mask is 1 on text tokens.

    config: jaxrl_vl ModelConfig. Returns make_batch rows ({"input_ids", "pixel_values",
    "image_grid_thw", "loss_mask"}), identical for a given seed in the JAX and PyTorch processes."""
    vision = config.vision
    unit = vision.patch_size * vision.spatial_merge_size
    if image_size % unit:
        raise ValueError(f"--image-size {image_size} must be a multiple of patch_size*merge = {unit}")
    grid_side = image_size // vision.patch_size
    patches_per_image = grid_side * grid_side
    tokens_per_image = patches_per_image // vision.spatial_merge_size ** 2
    image_block = tokens_per_image + 2  # + vision_start + vision_end
    text_tokens = seq_len - images_per_row * image_block
    if text_tokens < images_per_row + 1:
        raise ValueError(f"--seq-len {seq_len} is too short for {images_per_row} images of "
                         f"{tokens_per_image} tokens each; raise it or lower --images-per-row/--image-size")
    rng = np.random.default_rng(seed)
    start_id = config.vision_start_token_id
    end_id = config.vision_end_token_id
    rows = []
    for _ in range(batch_size):
        # text before each image and a tail after the last one, roughly equal pieces
        pieces = np.full(images_per_row + 1, text_tokens // (images_per_row + 1))
        pieces[-1] += text_tokens - pieces.sum()
        ids, mask = [], []
        for k in range(images_per_row + 1):
            text = rng.integers(0, text_token_range(like), int(pieces[k]))
            ids.append(text)
            mask.append(np.ones(len(text), np.float32))
            if k < images_per_row:
                block = np.concatenate([[start_id], np.full(tokens_per_image, config.image_token_id), [end_id]])
                ids.append(block)
                mask.append(np.zeros(len(block), np.float32))
        grid = np.tile(np.array([[1, grid_side, grid_side]], np.int64), (images_per_row, 1))
        pixels = rng.standard_normal((images_per_row * patches_per_image, vision.patch_dim), np.float32)
        rows.append({"input_ids": np.concatenate(ids).astype(np.int32), "pixel_values": pixels,
                     "image_grid_thw": grid, "loss_mask": np.concatenate(mask)})
    return rows


FLOPS_FORMULA = (
    "step FLOPs = (1 + b) * forward, b = 2 (full fine-tune) or 1 (LoRA: no weight gradients); "
    "forward = tokens * N*[2H(nh*d) + 4H(nkv*d) + 2(nh*d)H + 6HI + 4(nh*d)S] + logit_tokens * 2HV "
    "(logit_tokens: every token, or with --target-positions-multiple only those a target follows) "
    "+ patches * {2*patch_dim*Hv + Nv*[6Hv^2 + 2Hv^2 + mlp_v + 4Hv*P_img] "
    "+ (1+n_deepstack)/m^2 * [2(Hv m^2)^2 + 2(Hv m^2)H]}, mlp_v = 4*Hv*Iv (Qwen3-VL) or 6*Hv*Iv "
    "(Qwen2.5-VL); S = row length (full, not causally halved, as PaLM's 12*N*H*S), "
    "P_img = patches per image. Source: jaxrl_vl/train/flops.py. MFU = FLOPs / step_s / (989e12 * GPUs)."
)


def step_flops(config, *, batch_size: int, seq_len: int, images_per_row: int, image_size: int,
               lora: bool, logit_tokens: int | None = None) -> dict:
    """{"total", "text", "vision"} FLOPs of one training step (see FLOPS_FORMULA; jaxrl_vl.train.flops);
    logit_tokens: the tokens the lm_head runs on (None: all)."""
    from jaxrl_vl.train.flops import train_flops

    step = dict(num_tokens=batch_size * seq_len, seq_len=seq_len, backward_factor=1.0 if lora else 2.0,
                logit_tokens=logit_tokens)
    text = train_flops(config, **step)
    total = train_flops(config, **step, num_images=batch_size * images_per_row,
                        num_patches=batch_size * images_per_row * (image_size // config.vision.patch_size) ** 2)
    return {"total": total, "text": text, "vision": total - text}
