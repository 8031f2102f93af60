#!/usr/bin/env python
"""One training step (forward, backward, AdamW update) of a `--like` Qwen-VL model: ours (JAX) against
transformers + PyTorch on the same batch, in the same run. The last line printed is a JSON summary.

    python tools/bench_train.py --like qwen3_vl_2b                      # one GPU, full fine-tune
    python tools/bench_train.py --like qwen3_vl_8b --lora --skip-torch  # LoRA on the 8B shapes
    python tools/bench_train.py --like qwen3_vl_2b --mesh 2 --batch-size 4 --skip-torch   # FSDP, 2 GPUs
    python tools/bench_train.py --like tiny --seq-len 256 --image-size 64 --steps 2    # CPU smoke run

Weights are random, drawn directly on the device(s) in JAX (no checkpoint is written or read); the
PyTorch reference builds transformers' model from the same config.json dict with its own random init
(same shapes; values don't matter for speed). The step is the trainer's own (train/sft_step.make_sft_step, the
one `launch/train.py` runs) with the trainer's optimizer (AdamW, global-norm clip 1.0, cosine schedule): bf16
compute, fp32 master weights and fp32 AdamW states (LoRA: frozen base weights stored in bf16, adapters fp32);
`--param-dtype bfloat16` stores the trained weights and both AdamW moments in bf16 instead, the recipe of the
PyTorch reference. The loss is the trainer's chunked (fused) cross-entropy over the final hidden states, so no
full [B, L, V] fp32 logits ever exist. The PyTorch reference
(tools/bench_torch.py) runs first in its own process so the two frameworks never share GPU memory.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (device machines' rule)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402  (also puts the repo root on sys.path)
from jaxrl_vl.xla_flags import apply_defaults  # noqa: E402

apply_defaults()  # as launch/train.py: before JAX starts a backend

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16, vendor datasheet


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--like", default="qwen3_vl_2b", choices=bench_common.like_choices())
    p.add_argument("--batch-size", type=int, default=2, help="rows per step (global, over all GPUs)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--images-per-row", type=int, default=4)
    p.add_argument("--image-size", type=int, default=448, help="square images, pixels per side")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (rank --lora-rank) only")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--remat", default="dots", choices=("none", "dots_attn", "dots", "full"),
                   help="per-layer rematerialisation (models.layers.REMAT_POLICIES): none (save everything), "
                        "dots_attn (save matmul outputs and the cuDNN attention forward), dots (save matmul "
                        "outputs), full (save only each layer's input)")
    p.add_argument("--attention", default="cudnn_causal", choices=("auto", "xla", "cudnn", "cudnn_causal"),
                   help="text attention (models.text.ATTENTION_IMPLS); cudnn_causal needs unpacked rows, "
                        "which this benchmark's rows are")
    p.add_argument("--layer-loop", default="scan", choices=("scan", "unrolled"),
                   help="text decoder layers under lax.scan or a Python loop (models.text.decoder)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="sequence positions per cross-entropy chunk")
    p.add_argument("--target-positions-multiple", type=int, default=256,
                   help="logits only at the positions a target follows (the trainer's "
                        "train.target_positions_multiple; not image or padding positions), their count rounded up "
                        "to this multiple; 0: at every position, as the PyTorch reference computes them")
    p.add_argument("--no-cast-params", action="store_true",
                   help="keep fp32 weights until each matmul (default: cast the trained tree to bf16 once "
                        "per step, so FSDP gathers bf16 and the scan reads bf16)")
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="trained weights and AdamW moments: float32 (master weights, our trainer's default) or "
                        "bfloat16 (the PyTorch reference's recipe: bf16 params, bf16 AdamW states)")
    p.add_argument("--mesh", type=int, default=1, help="FSDP over this many GPUs (batch split too)")
    p.add_argument("--fsdp-gather", default="layer", choices=("layer", "step"),
                   help="layer: XLA gathers each weight where it is used, again in the backward (ZeRO-3); step: "
                        "the bf16 compute copy is gathered once per step and kept for the backward, weights and "
                        "AdamW states stay sharded (PyTorch FSDP's SHARD_GRAD_OP; costs one bf16 model copy)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the vision tower alone (forward + backward to its weights)")
    p.add_argument("--profile", default="",
                   help="also trace 2 steps with jax.profiler into this folder and print the top device ops "
                        "(tools/profile_summary.py)")
    p.add_argument("--skip-torch", action="store_true", help="skip the transformers + PyTorch reference")
    p.add_argument("--torch-attention", default="auto", help="auto = flash_attention_2 if installed, else sdpa")
    p.add_argument("--torch-liger", action="store_true", help="the PyTorch reference with liger-kernel's Qwen3-VL kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default="", help="also write the summary JSON to this file")
    return p.parse_args(argv)


def run_torch_reference(args) -> dict:
    """tools/bench_torch.py in a child process (its GPU memory is freed before JAX starts)."""
    cmd = [sys.executable, str(Path(__file__).with_name("bench_torch.py")), "--like", args.like,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--images-per-row", str(args.images_per_row), "--image-size", str(args.image_size),
           "--steps", str(args.steps), "--seed", str(args.seed), "--attention", args.torch_attention]
    if args.lora:
        cmd += ["--lora", "--lora-rank", str(args.lora_rank)]
    if args.torch_liger:
        cmd.append("--liger")
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"bench_torch exited {proc.returncode}: {proc.stderr.strip()[-1500:]}",
                "wall_s": time.time() - started}
    return json.loads(lines[-1])


def init_params(config, seed: int, dtype, shardings_of=None, unstacked: bool = False):
    """Random params (HF-named, stacked lists) drawn on the device in one jitted program:
    weights N(0, 0.02), norm weights 1, biases 0. shardings_of(abstract tree) -> out shardings.
    unstacked: layer lists as Python lists of per-layer trees, split after the draw (models.layout: one
    small program per leaf shape; drawing and splitting ~600 leaves in one program compiled for minutes);
    the stacked copies are dropped once split."""
    import jax
    import jax.numpy as jnp
    from jaxrl_vl.models import checkpoint, layout

    stacked: dict[tuple, list] = {}
    for name, shape in checkpoint.expected_shapes(config).items():
        parts, index = checkpoint._split_stacked(name)
        entry = stacked.setdefault(tuple(parts), [shape, 0])
        entry[1] += index is not None
    abstract: dict = {}
    for parts, (shape, count) in sorted(stacked.items()):
        full_shape = ((count,) if count else ()) + tuple(shape)
        checkpoint._set(abstract, list(parts), jax.ShapeDtypeStruct(full_shape, dtype))
    names = [".".join(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    treedef = jax.tree_util.tree_structure(abstract)

    def draw(key):
        leaves = []
        for name, leaf, k in zip(names, jax.tree_util.tree_leaves(abstract), jax.random.split(key, len(names))):
            is_norm = any(part in name for part in ("norm", "ln_q")) and name.endswith(".weight")
            if is_norm:
                leaves.append(jnp.ones(leaf.shape, dtype))
            elif name.endswith(".bias"):
                leaves.append(jnp.zeros(leaf.shape, dtype))
            else:
                leaves.append((0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(dtype))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    params = jax.jit(draw, out_shardings=None if shardings_of is None else shardings_of(abstract))(
        jax.random.PRNGKey(seed))
    if not unstacked:
        return params
    params = layout.unstack_layers(params)
    return params if shardings_of is None else jax.device_put(params, shardings_of(params))


def make_step(config, args, lora_cfg, optimizer, schedule, state, mesh):
    """The trainer's own SFT step (train/sft_step.make_sft_step on train/step.py) for this run's settings: what
    `launch/train.py` builds from model.dtype/attention/layer_loop/remat, train.loss_chunk_size,
    train.cast_once_per_step and mesh.fsdp_gather. The state is donated (updated in place) and its placement
    pinned, so step i's outputs are valid inputs of step i+1 of the compiled program."""
    import jax.numpy as jnp
    from jaxrl_vl import sharding
    from jaxrl_vl.models.lora import overlay
    from jaxrl_vl.train.sft_step import make_sft_step
    from jaxrl_vl.train.state import state_shardings
    from jaxrl_vl.train.step import Forward, ParamsView

    forward = Forward(config, dtype=jnp.bfloat16, remat=args.remat, layer_loop=args.layer_loop,
                      attention=args.attention, loss_chunk_size=args.loss_chunk)
    view = ParamsView(jnp.bfloat16, cast_once=not args.no_cast_params,
                      lora_overlay=None if lora_cfg is None else (lambda p, lo: overlay(p, lo, lora_cfg)),
                      gather_mesh=mesh if args.fsdp_gather == "step" and args.mesh > 1 else None)
    return make_sft_step(forward, optimizer, schedule, view, mesh=mesh, donate=True,
                         state_shardings=state_shardings(state), metrics_sharding=sharding.replicated(mesh))


def time_vision_tower(visual_params, config, batch, remat: str, repeats: int = 3) -> dict:
    """Seconds of the vision tower's forward + backward (grads of its weights) on the batch's patches."""
    import jax
    import jax.numpy as jnp
    from jaxrl_vl.models.vision import apply_vision

    vinputs = {k: v for k, v in batch.items() if k.startswith("vision_")}

    def total(visual):
        visual = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim >= 2 else a, visual)
        embeds, deepstack = apply_vision(visual, config.vision, batch["pixel_values"], vinputs, jnp.bfloat16,
                                         remat=remat)
        out = jnp.sum(embeds.astype(jnp.float32))
        return out if deepstack is None else out + jnp.sum(deepstack.astype(jnp.float32))

    grad = jax.jit(jax.grad(total))
    started = time.perf_counter()
    compiled = grad.lower(visual_params).compile()
    compile_s = time.perf_counter() - started
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        jax.block_until_ready(compiled(visual_params))
        if i:
            times.append(time.perf_counter() - started)
    return {"vision_fwd_bwd_s": float(np.median(times)), "vision_compile_s": compile_s}


def bench_optimizer(args, num_steps: int):
    """The trainer's optimizer (train/optim.make_optimizer) with configs/base.py's settings: AdamW with global-norm
    clipping and the cosine schedule; --param-dtype bfloat16 also stores the first moment in bf16."""
    import jax.numpy as jnp
    from jaxrl_vl.train.config_overrides import load_config_file
    from jaxrl_vl.train.optim import make_optimizer

    optim = load_config_file(str(Path(__file__).resolve().parents[1] / "configs" / "base.py")).optim
    optim.learning_rate, optim.warmup_steps = 1e-5, 0
    return make_optimizer(optim, num_steps, jnp.bfloat16 if args.param_dtype == "bfloat16" else None)


def init_state(args, config, mesh, optimizer):
    """TrainState of random params (LoRA: a bf16 frozen base and fp32 adapters, bf16 with --param-dtype
    bfloat16), placed by the trainer's sharding rules."""
    import jax
    import jax.numpy as jnp
    from jaxrl_vl import sharding
    from jaxrl_vl.models.lora import LoraConfig, init_lora
    from jaxrl_vl.train.state import create_train_state

    bf16_states = args.param_dtype == "bfloat16"
    param_dtype = jnp.bfloat16 if args.lora or bf16_states else jnp.float32
    # The unrolled loop reads per-layer params (no slicing of a stack inside the step): store them unstacked.
    params = init_params(config, args.seed, param_dtype, lambda tree: sharding.param_shardings(tree, mesh),
                         unstacked=args.layer_loop == "unrolled")
    lora_cfg, lora = None, None
    if args.lora:
        lora_cfg = LoraConfig(rank=args.lora_rank, alpha=float(args.lora_rank), targets=("attention", "mlp"))
        lora = init_lora(params, lora_cfg, jax.random.PRNGKey(args.seed + 1))
        if bf16_states:
            lora = jax.tree.map(lambda a: a.astype(jnp.bfloat16), lora)
        lora = sharding.shard_params(lora, mesh)
    return create_train_state(params, optimizer, jax.random.PRNGKey(args.seed), lora=lora, mesh=mesh), lora_cfg


def compile_step(args, config, lora_cfg, optimizer, schedule, state, batch, mesh):
    """-> (compiled step, attention used, compile errors). If the requested cuDNN attention does not lower on
    this machine, fall back (and say so) rather than lose the run: cudnn_causal -> cudnn (mask as bias) -> xla."""
    import jax
    fallbacks = {"cudnn_causal": "cudnn", "cudnn": "xla", "auto": "xla"}
    attention, errors = args.attention, []
    if jax.default_backend() != "gpu" and attention.startswith("cudnn"):
        attention = "xla"  # cuDNN exists on GPUs only
    while True:
        step = make_step(config, argparse.Namespace(**{**vars(args), "attention": attention}), lora_cfg, optimizer,
                         schedule, state, mesh)
        try:
            return step.lower(state, batch).compile(), attention, errors
        except Exception as error:  # noqa: BLE001 - reported in the summary, then the next implementation
            errors.append(f"attention={attention}: {type(error).__name__}: {str(error)[:600]}")
            print("compile failed:", errors[-1], file=sys.stderr, flush=True)
            if attention not in fallbacks:
                raise
            attention = fallbacks[attention]


def stacked_batch(args, config, rows, mesh) -> dict:
    """The rows as the trainer's collate stacks them ([1, B, ...], one micro-batch), placed on the mesh."""
    import jax
    from jaxrl_vl import models, sharding
    from jaxrl_vl.losses.target_positions import target_positions

    batch = models.make_batch(rows, config, pad_to_length=args.seq_len, num_shards=args.mesh)
    batch = {k: v[None] for k, v in batch.items() if k != "image_grid_thw"}  # host-side only
    if args.target_positions_multiple > 0:
        batch["target_positions"] = target_positions(batch["loss_mask"], args.target_positions_multiple)
    return jax.device_put(batch, sharding.stacked_batch_shardings(batch, mesh))


def time_steps(compiled, state, batch, steps: int):
    """-> (state, synced step times after 2 warm-up steps, losses, steady-state seconds per step)."""
    import jax
    step_times, losses = [], []
    for i in range(steps + 2):
        started = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # synchronises
        if i >= 2:
            step_times.append(time.perf_counter() - started)
    # Steady state, the headline: the same number of steps back to back and one wait at the end, so the host
    # dispatches step i+1 while the device runs step i (a training loop that does not block on every loss;
    # the PyTorch reference is timed the same way). step_s_synced: each step waited for on its own.
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return state, step_times, losses, (time.perf_counter() - started) / steps


def run_jax(args, config, rows) -> dict:
    import jax
    from jaxrl_vl import models, sharding

    devices = jax.devices()[:args.mesh]
    if len(devices) < args.mesh:
        raise SystemExit(f"--mesh {args.mesh} needs {args.mesh} devices, found {len(jax.devices())}")
    mesh = sharding.make_mesh(fsdp=args.mesh, devices=devices)
    started = time.perf_counter()
    optimizer, schedule = bench_optimizer(args, 2 * args.steps + 2)
    state, lora_cfg = init_state(args, config, mesh, optimizer)
    batch = stacked_batch(args, config, rows, mesh)
    # The vision tower runs on [shards, slots, slot_len] (same-size frames: one per slot; models.vision_inputs), one
    # batch shard per FSDP device.
    vision_slots = list(np.shape(batch["vision_slot_patches"]))[1:] if "vision_slot_patches" in batch else None
    jax.block_until_ready((state, batch))
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled, attention, errors = compile_step(args, config, lora_cfg, optimizer, schedule, state, batch, mesh)
    compile_s = time.perf_counter() - started
    state, step_times, losses, pipelined_s = time_steps(compiled, state, batch, args.steps)
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices)
    extra = {}
    if args.profile:
        import profile_summary
        with jax.profiler.trace(args.profile):
            for _ in range(2):
                state, metrics = compiled(state, batch)
            float(metrics["loss"])
        extra["profile"] = profile_summary.summarize(args.profile, steps=2, top=100)
        print(profile_summary.format_table(extra["profile"]), file=sys.stderr, flush=True)
    if args.breakdown and not args.lora:
        extra = time_vision_tower(state.params["model"]["visual"], config, {k: v[0] for k, v in batch.items()},
                                  args.remat)
    return {**extra, "vision_slots": vision_slots, "step_s": pipelined_s, "step_s_synced": float(np.median(step_times)),
            "step_s_synced_all": step_times, "compile_s": compile_s, "init_s": init_s, "attention_used": attention,
            "compile_errors": errors, "peak_memory_gib": peak / 2**30, "loss_first_last": [losses[0], losses[-1]],
            "num_params": models.num_params(state.params),
            "params_layout": "unstacked" if models.is_unstacked(state.params) else "stacked",
            "num_trainable": models.num_params(state.trainable), "devices": [d.device_kind for d in devices]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxrl_vl.models.config import ModelConfig

    hf_dict = bench_common.hf_config_dict(args.like)
    config = ModelConfig.from_hf_dict(hf_dict)
    rows = bench_common.build_rows(config, args.like, args.batch_size, args.seq_len, args.images_per_row,
                                   args.image_size, args.seed)
    # the lm_head runs on every token, or with target positions on those a target follows (shifted_targets)
    logit_tokens = (sum(int(np.count_nonzero(r["loss_mask"][1:])) for r in rows)
                    if args.target_positions_multiple > 0 else None)
    flops = bench_common.step_flops(config, batch_size=args.batch_size, seq_len=args.seq_len,
                                    images_per_row=args.images_per_row, image_size=args.image_size,
                                    lora=args.lora, logit_tokens=logit_tokens)
    torch_result = None
    if not args.skip_torch:
        torch_result = run_torch_reference(args)
        print("torch:", json.dumps(torch_result), flush=True)
    jax_result = run_jax(args, config, rows)
    import jax

    tokens = args.batch_size * args.seq_len
    on_gpu = jax.default_backend() == "gpu"
    peak = PEAK_BF16_FLOPS if on_gpu else 1e11

    def rates(result: dict, devices: int) -> dict:
        if "step_s" not in result:
            return result
        seconds = result["step_s"]
        return {**result, "tokens_per_s": tokens / seconds, "mfu": flops["total"] / seconds / (peak * devices),
                "tokens_per_s_synced": tokens / result["step_s_synced"]}

    summary = {
        "benchmark": "train_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python tools/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # with jaxrl_vl.xla_flags' defaults
        "card": jax.devices()[0].device_kind, "backend": jax.default_backend(), "gpus": args.mesh,
        "like": args.like, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "images_per_row": args.images_per_row, "image_size": args.image_size, "lora": args.lora,
        "remat": args.remat, "layer_loop": args.layer_loop,
        "target_positions_multiple": args.target_positions_multiple, "logit_tokens": logit_tokens or tokens,
        "params_layout": jax_result["params_layout"], "attention": args.attention,
        "cast_params_bf16": not args.no_cast_params,
        "param_dtype": args.param_dtype, "fsdp_gather": args.fsdp_gather,
        "tokens_per_step": tokens, "step_flops": flops, "flops_formula": bench_common.FLOPS_FORMULA,
        "peak_flops_per_gpu": peak,
        "timing": "step_s: --steps steps back to back, one wait at the end (steady state); step_s_synced: the median "
                  "step when each is waited for on its own. Both for ours and the PyTorch reference.",
        "jax": rates(jax_result, args.mesh),
    }
    if torch_result is not None:
        summary["torch"] = rates(torch_result, 1)
        if "tokens_per_s" in summary["torch"]:
            summary["speedup_vs_torch"] = summary["jax"]["tokens_per_s"] / summary["torch"]["tokens_per_s"]
            summary["speedup_vs_torch_synced"] = summary["torch"]["step_s_synced"] / summary["jax"]["step_s_synced"]
    line = json.dumps(summary)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return summary


if __name__ == "__main__":
    main()
