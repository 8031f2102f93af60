"""Logit parity of the JAX Qwen-VL model against transformers (fp32, CPU).

    python tools/check_parity.py --model DIR [--dtype float32] [--seed 0] [--platform cpu|gpu]

Builds one right-padded batch with rows of several images of different sizes, a text-only row and a
single-image row: with the checkpoint's own processor and chat template when the folder has them (3 rows,
3 images), else with synthesized token ids and pixel patches from the config (4 rows, 5 images). Runs transformers' model on it (its own
get_rope_index, masked_scatter, attention mask) and ours (make_batch + apply), compares logits on the
real tokens, and prints a JSON summary as the last line:
  {"max_abs_logit_diff", "mean_abs_logit_diff", "max_abs_logit", "arch", "num_params", "num_tokens",
   "num_images", "batch_source", "dtype", "jax_seconds_incl_compile", "jax_seconds", "jax_device",
   "torch_seconds", "tolerance", "ok"}
Exit status 1 when max_abs_logit_diff > --tolerance (default 1e-4).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (t, h, w) patch grids of the synthesized images: different sizes and aspect ratios, multiples of merge
_SYNTH_GRIDS = ([1, 4, 6], [1, 6, 4], [1, 2, 2], [1, 8, 8])
_IMAGE_SIZES_PX = ((200, 150), (96, 260), (64, 64), (320, 240))


def _synthetic_rows(config, rng: np.random.Generator) -> list[dict]:
    """Rows of random token ids (avoiding special ids) with image blocks, and random normalized patches."""
    merge = config.vision.spatial_merge_size
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id}
    vocab = config.text.vocab_size
    high = min(vocab, min(s for s in special if s > 0) if special else vocab)
    high = high if high > 8 else vocab

    def text(n):
        toks = rng.integers(0, high, n)
        return [int(t) for t in toks if int(t) not in special] or [1]

    def image(grid):
        tokens = [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(grid)) // merge ** 2) + [
            config.vision_end_token_id]
        pixels = rng.standard_normal((int(np.prod(grid)), config.vision.patch_dim)).astype(np.float32)
        return tokens, pixels

    layouts = [[_SYNTH_GRIDS[0], _SYNTH_GRIDS[1]], [], [_SYNTH_GRIDS[2]], [_SYNTH_GRIDS[3], _SYNTH_GRIDS[2]]]
    rows = []
    for r, grids in enumerate(layouts):
        ids, pixels = text(3 + r), []
        for grid in grids:
            tokens, pix = image(grid)
            ids += tokens + text(2 + r)
            pixels.append(pix)
        ids += text(5 - r)
        row = {"input_ids": np.asarray(ids, np.int32)}
        if grids:
            row["pixel_values"] = np.concatenate(pixels)
            row["image_grid_thw"] = np.asarray(grids, np.int32)
        rows.append(row)
    return rows


def _processor_rows(model_dir: str, rng: np.random.Generator) -> list[dict] | None:
    """Rows made by the checkpoint's own processor and chat template; None when it has none."""
    if not os.path.exists(os.path.join(model_dir, "preprocessor_config.json")):
        return None
    try:
        from PIL import Image
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(model_dir)
    except Exception as e:  # a folder without a usable processor is still checked, with synthetic inputs
        print(f"processor not usable ({type(e).__name__}: {e}); using synthetic inputs", file=sys.stderr)
        return None

    def img(size):
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))

    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": img(_IMAGE_SIZES_PX[0])},
                                      {"type": "text", "text": "Compare these two pictures."},
                                      {"type": "image", "image": img(_IMAGE_SIZES_PX[1])}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hello, how many sides has a square?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": img(_IMAGE_SIZES_PX[2])},
                                      {"type": "text", "text": "What is this?"}]}],
    ]
    rows = []
    for conversation in conversations:
        enc = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="np",
                                            add_generation_prompt=True)
        row = {"input_ids": np.asarray(enc["input_ids"][0], np.int32)}
        if "pixel_values" in enc:
            row["pixel_values"] = np.asarray(enc["pixel_values"], np.float32)
            row["image_grid_thw"] = np.asarray(enc["image_grid_thw"], np.int32)
        rows.append(row)
    return rows


def _torch_logits(model_dir: str, config, batch: dict) -> tuple[np.ndarray, float]:
    import torch
    import transformers

    cls = {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[config.arch]
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    input_ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    kwargs = {"input_ids": input_ids, "attention_mask": torch.tensor(batch["segment_ids"] > 0, dtype=torch.long),
              "mm_token_type_ids": (input_ids == config.image_token_id).long()}
    if "pixel_values" in batch:
        grid = batch["image_grid_thw"]
        real = int(np.prod(grid, axis=1).sum())
        kwargs["pixel_values"] = torch.tensor(batch["pixel_values"][0, :real])  # make_batch: one batch shard
        kwargs["image_grid_thw"] = torch.tensor(grid, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(**kwargs).logits.float().numpy()
    return logits, time.perf_counter() - start


def run(model_dir: str, dtype: str = "float32", seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxrl_vl.models import ModelConfig, apply, load, make_batch, num_params

    with open(os.path.join(model_dir, "config.json")) as f:
        config = ModelConfig.from_hf_dict(json.load(f))
    rng = np.random.default_rng(seed)
    rows = _processor_rows(model_dir, rng)
    source = "processor"
    if rows is None:
        rows, source = _synthetic_rows(config, rng), "synthetic"
    batch = make_batch(rows, config)
    torch_logits, torch_seconds = _torch_logits(model_dir, config, batch)  # torch model freed on return
    _, params = load(model_dir)  # loaded after, so both models never sit in memory together

    start = time.perf_counter()
    forward = jax.jit(lambda p, b: apply(p, b, config, dtype=jnp.dtype(dtype)))
    ours = np.asarray(forward(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    jax_seconds = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(forward(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    jax_run_seconds = time.perf_counter() - start

    real = batch["segment_ids"] > 0
    diff = np.abs(ours[real] - torch_logits[real])
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit": float(np.abs(torch_logits[real]).max()),
            "arch": config.arch, "num_params": num_params(params), "num_tokens": int(real.sum()),
            "num_images": int(len(batch.get("image_grid_thw", ()))), "batch_source": source, "dtype": dtype,
            "jax_seconds_incl_compile": round(jax_seconds, 3),
            "jax_seconds": round(jax_run_seconds, 3), "jax_device": str(jax.devices()[0].platform),
            "torch_seconds": round(torch_seconds, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local Hugging Face model folder (Qwen3-VL or Qwen2.5-VL)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="JAX compute dtype (transformers always runs fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--platform", default="cpu", help="JAX platform for our model (cpu, gpu); transformers "
                        "always runs on CPU. Off CPU, fp32 matmuls are forced to full precision (no TF32).")
    args = parser.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(args.platform, args.platform)
    if args.platform != "cpu":
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
    result = run(args.model, args.dtype, args.seed)
    result["tolerance"] = args.tolerance
    result["ok"] = result["max_abs_logit_diff"] <= args.tolerance
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
