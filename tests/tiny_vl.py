"""Tiny random Qwen-VL models for tests: configs, spread-out params and rows with images (also imported by
test subprocesses)."""
from __future__ import annotations

import jax
import numpy as np

from jaxrl_vl import models
from jaxrl_vl.models.config import ModelConfig


def tiny_config(arch="qwen3_vl"):
    """A tiny random-weight shape of `arch` (Qwen3-VL: one DeepStack tap; Qwen2.5-VL: windowed + full blocks)."""
    text = dict(vocab_size=256, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=10, rms_norm_eps=1e-6)
    vision = dict(depth=2, hidden_size=24, intermediate_size=56, num_heads=2, out_hidden_size=40, patch_size=4,
                  hidden_act="gelu_pytorch_tanh")
    if arch == "qwen3_vl":
        text["rope_parameters"] = dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 2, 1],
                                       mrope_interleaved=True)
        vision.update(num_position_embeddings=49, deepstack_visual_indexes=[0])
    else:
        text["rope_parameters"] = dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 2, 1])
        vision.update(window_size=16, fullatt_block_indexes=[1], hidden_act="silu")
    return ModelConfig.from_hf_dict({"model_type": arch, "tie_word_embeddings": False, "text_config": text,
                                     "vision_config": vision, "image_token_id": 250, "video_token_id": 251,
                                     "vision_start_token_id": 248, "vision_end_token_id": 249})


def image_rows(config, layouts, seed=0):
    """One row per entry of `layouts` (a list of [t, h, w] patch grids): random text around image blocks, random
    pixels, next-token targets and a loss weight per token."""
    rng = np.random.default_rng(seed)
    merge = config.vision.spatial_merge_size
    rows = []
    for grids in layouts:
        ids, pixels = list(rng.integers(1, 240, 3)), []
        for grid in grids:
            ids += [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(grid)) // merge ** 2)
            ids += [config.vision_end_token_id] + list(rng.integers(1, 240, 2))
            pixels.append(rng.standard_normal((int(np.prod(grid)), config.vision.patch_dim)).astype(np.float32))
        ids = np.asarray(ids, np.int32)
        row = {"input_ids": ids, "targets": np.roll(ids, -1),
               "weights": (ids != config.image_token_id).astype(np.float32)}
        if grids:
            row["pixel_values"] = np.concatenate(pixels)
            row["image_grid_thw"] = np.asarray(grids, np.int32)
        rows.append(row)
    return rows


# Shard 0 (rows 0-1): two images of different sizes and a text-only row; shard 1 (rows 2-3): fewer patches.
LAYOUT_A = [[[1, 4, 6], [1, 6, 8]], [], [[1, 4, 4]], [[1, 2, 4]]]
# Shard 1 (rows 2-3) has no image at all.
LAYOUT_B = [[[1, 6, 8], [1, 2, 4]], [[1, 4, 6]], [], []]


def spread_params(config):
    """Random params spread out (norms ~1, the rest N(0, 0.15^2)) so logits and grads are O(1)."""
    params = models.init(config, jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        (1.0 + 0.2 * jax.random.normal(k, x.shape)) if "norm" in jax.tree_util.keystr(p)
        else 0.15 * jax.random.normal(k, x.shape) for (p, x), k in zip(leaves, keys)])
