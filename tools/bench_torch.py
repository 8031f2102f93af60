#!/usr/bin/env python
"""The transformers + PyTorch reference for tools/bench_train.py: the same training step (forward,
backward, AdamW update) on the same synthetic batch, with transformers' own Qwen-VL implementation.

bf16 parameters and bf16 AdamW states (torch.optim.AdamW, fused), the best attention implementation
installed (flash_attention_2 if the flash_attn package is importable, else sdpa), no gradient
checkpointing, transformers' own loss (labels=..., which upcasts the full logits to fp32). The model is
built from the same config.json dict with transformers' random init, directly on the GPU.
Run by bench_train.py in a child process; prints one JSON line last.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--like", default="qwen3_vl_2b", choices=bench_common.like_choices())
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--images-per-row", type=int, default=4)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="auto", help="auto | sdpa | flash_attention_2 | eager")
    p.add_argument("--liger", action="store_true",
                   help="liger-kernel's Qwen3-VL patches (apply_liger_kernel_to_qwen3_vl: fused linear cross-entropy, "
                        "RMSNorm, SwiGLU, rope), the strongest PyTorch setting")
    return p.parse_args(argv)


def build_model(hf_dict: dict, attention: str, device):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config_dict = dict(hf_dict)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16,
                                                        attn_implementation=attention)
    return model


def torch_batch(rows: list[dict], position_ids: np.ndarray, image_token_id: int, device) -> dict:
    import torch

    input_ids = torch.tensor(np.stack([r["input_ids"] for r in rows]), dtype=torch.long, device=device)
    loss_mask = np.stack([r["loss_mask"] for r in rows])
    labels = input_ids.clone()
    labels[torch.tensor(loss_mask == 0, device=device)] = -100
    return {
        "input_ids": input_ids,
        "labels": labels,
        # our M-RoPE ids equal transformers' get_rope_index; passing them skips its host-side loop
        "position_ids": torch.tensor(position_ids, dtype=torch.long, device=device),
        "pixel_values": torch.tensor(np.concatenate([r["pixel_values"] for r in rows]), device=device,
                                     dtype=torch.bfloat16),
        "image_grid_thw": torch.tensor(np.concatenate([r["image_grid_thw"] for r in rows]), device=device),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from jaxrl_vl.models.config import ModelConfig
    from jaxrl_vl.models.inputs import make_batch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = args.attention
    if attention == "auto":
        attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    hf_dict = bench_common.hf_config_dict(args.like)
    config = ModelConfig.from_hf_dict(hf_dict)
    rows = bench_common.build_rows(config, args.like, args.batch_size, args.seq_len, args.images_per_row,
                                   args.image_size, args.seed)
    position_ids = make_batch(rows, config, pad_to_length=args.seq_len)["position_ids"]
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.liger:  # patches transformers' Qwen3-VL classes before the model is built
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
        apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                       cross_entropy=False)
    model = build_model(hf_dict, attention, device)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank,
                                                 target_modules=targets))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, fused=device == "cuda")
    batch = torch_batch(rows, position_ids, config.image_token_id, device)
    init_s = time.perf_counter() - started

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = step()
        losses.append(float(loss))  # synchronises
        if i >= 2:
            times.append(time.perf_counter() - started)
    # Steady state (the headline, as bench_train.py times ours): the steps back to back, one wait at the end.
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()  # the last optimizer step included
    float(loss)
    pipelined_s = (time.perf_counter() - started) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    result = {"step_s": pipelined_s, "step_s_synced": float(np.median(times)), "step_s_synced_all": times,
              "init_s": init_s,
              "peak_memory_gib": peak, "attention": attention, "liger": args.liger,
              "loss_first_last": [losses[0], losses[-1]],
              "num_params": sum(p.numel() for p in model.parameters()),
              "num_trainable": sum(p.numel() for p in trainable),
              "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
