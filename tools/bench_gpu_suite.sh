#!/usr/bin/env bash
# The GPU benchmark runs behind the README's performance section, in one go (one machine start).
# Needs 2 GPUs for the FSDP run; the single-GPU runs use GPU 0 only. Usage:
#   OUT=/some/dir [RUNS='2b_1gpu 2b_fsdp2 ...'] [T=seconds per run] bash tools/bench_gpu_suite.sh
# Each run has its own time limit so one failure or hang does not lose the others; every run writes
# OUT/<name>.json (its last JSON line) and OUT/<name>.log.
set -u
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
STEPS=${STEPS:-3}

run() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $* (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" $PY tools/bench_train.py --steps "$STEPS" --json-out "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "rc=$? $(date -u +%T)"
  grep -E '^(torch:|compile failed)' "$OUT/$name.log" | cut -c1-400
  tail -c 1500 "$OUT/$name.log" | grep -v '^{' | tail -5
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
TWO_B="--like qwen3_vl_2b --attention cudnn_causal"  # 4096-token rows, four 448x448 images per row
LHS="--xla_gpu_enable_latency_hiding_scheduler=true"
PIPE="$LHS --xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true"
for name in ${RUNS:-2b_1gpu 2b_fsdp2 8b_lora}; do
  case $name in
    # 2B full fine-tune on one GPU vs transformers + PyTorch on the same batch (2 rows): the fastest setting,
    # decoder layers unrolled (no activation copies in and out of scan stacks; compiles in ~3 min)
    2b_1gpu) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 2 --remat dots_attn --layer-loop unrolled ;;
    # the PyTorch reference's recipe (bf16 params and bf16 AdamW moments) on ours too, same batch, side by side
    2b_1gpu_bf16) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 2 --remat dots_attn --layer-loop unrolled \
      --param-dtype bfloat16 ;;
    # no rematerialisation at all (unrolled layers: nothing recomputed in the backward; more memory, and
    # the fastest setting since the layers are stored unstacked), with PyTorch side by side
    2b_1gpu_bf16_remat_none) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 2 --remat none \
      --layer-loop unrolled --param-dtype bfloat16 ;;
    # the same at one row per step (the PyTorch reference launches its kernels from Python, which one row hides less)
    2b_1gpu_bf16_remat_none_b1) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 1 --remat none \
      --layer-loop unrolled --param-dtype bfloat16 ;;
    # A/B of the cross-entropy: logprobs first and their gradient in the backward (what RL losses need)
    # against the default fused loss (gradient formed in the forward pass) of 2b_1gpu_bf16_remat_none
    2b_1gpu_bf16_remat_none_logprobs) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 2 --remat none \
      --layer-loop unrolled --param-dtype bfloat16 --loss logprobs --skip-torch ;;
    # A/B of target positions: logits at every position (as the PyTorch reference) instead of only where a target follows
    2b_1gpu_bf16_remat_none_all_logits) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 2 --remat none \
      --layer-loop unrolled --param-dtype bfloat16 --target-positions-multiple 0 --skip-torch ;;
    2b_1gpu_bf16_remat_none_chunk2048) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 2 --remat none \
      --layer-loop unrolled --param-dtype bfloat16 --loss-chunk 2048 --skip-torch ;;
    2b_1gpu_bf16_remat_none_no_triton_gemm) CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \
      run $name ${T:-330} $TWO_B --batch-size 2 --remat none --layer-loop unrolled --param-dtype bfloat16 --skip-torch ;;
    # traced, with the optimized HLO dumped next to it (to map the trace's fusion names to model code)
    2b_1gpu_bf16_remat_none_profiled) CUDA_VISIBLE_DEVICES=0 \
      XLA_FLAGS="--xla_dump_to=$OUT/hlo_$name --xla_dump_hlo_module_re=jit_step --xla_dump_hlo_pass_re=NONE" \
      run $name ${T:-330} $TWO_B --batch-size 2 --remat none --layer-loop unrolled --param-dtype bfloat16 --skip-torch \
      --profile "$OUT/trace_$name" ;;
    2b_1gpu_bf16_profiled) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 2 --remat dots_attn \
      --layer-loop unrolled --param-dtype bfloat16 --skip-torch --profile "$OUT/trace_$name" ;;
    2b_1gpu_bf16_scan) CUDA_VISIBLE_DEVICES=0 run $name ${T:-120} $TWO_B --batch-size 2 --remat dots_attn --skip-torch \
      --param-dtype bfloat16 --profile "$OUT/trace_$name" ;;
    # the same under lax.scan (compiles in ~20 s), plus the vision tower timed alone
    2b_1gpu_scan) CUDA_VISIBLE_DEVICES=0 run $name ${T:-90} $TWO_B --batch-size 2 --remat dots_attn --skip-torch \
      --breakdown ;;
    2b_1gpu_dots) CUDA_VISIBLE_DEVICES=0 run $name ${T:-90} $TWO_B --batch-size 2 --remat dots --skip-torch ;;
    2b_1gpu_remat_none) CUDA_VISIBLE_DEVICES=0 run $name ${T:-90} $TWO_B --batch-size 2 --remat none --skip-torch ;;
    # FSDP over two GPUs, 2 rows per GPU (compare with 2b_1gpu*): unrolled layers let the latency-hiding
    # scheduler overlap each layer's weight all-gather with the previous layer's compute
    2b_fsdp2) XLA_FLAGS=$LHS run $name ${T:-330} $TWO_B --batch-size 4 --remat dots_attn --layer-loop unrolled \
      --mesh 2 --skip-torch ;;
    2b_fsdp2_bf16) XLA_FLAGS=$LHS run $name ${T:-330} $TWO_B --batch-size 4 --remat dots_attn --layer-loop unrolled \
      --mesh 2 --skip-torch --param-dtype bfloat16 ;;
    # the bf16 compute copy gathered once per step and kept for the backward (FSDP SHARD_GRAD_OP / ZeRO-2)
    2b_fsdp2_bf16_gather_step) XLA_FLAGS=$LHS run $name ${T:-330} $TWO_B --batch-size 4 --remat dots_attn \
      --layer-loop unrolled --mesh 2 --skip-torch --param-dtype bfloat16 --fsdp-gather step ;;
    2b_1gpu_bf16_notorch) CUDA_VISIBLE_DEVICES=0 run $name ${T:-330} $TWO_B --batch-size 2 --remat dots_attn \
      --layer-loop unrolled --param-dtype bfloat16 --skip-torch ;;
    # weak scaling at 4 rows (16k tokens) per GPU: the per-step gather + reduce-scatter spread over twice the work
    2b_1gpu_bf16_b4) CUDA_VISIBLE_DEVICES=0 run $name ${T:-290} $TWO_B --batch-size 4 --remat dots_attn \
      --layer-loop unrolled --param-dtype bfloat16 --skip-torch ;;
    2b_fsdp2_bf16_gather_step_b8) XLA_FLAGS=$LHS run $name ${T:-290} $TWO_B --batch-size 8 --remat dots_attn \
      --layer-loop unrolled --mesh 2 --skip-torch --param-dtype bfloat16 --fsdp-gather step ;;
    # the same weak scaling without rematerialisation (the fastest one-GPU setting since session 7)
    2b_1gpu_bf16_remat_none_b4) CUDA_VISIBLE_DEVICES=0 run $name ${T:-290} $TWO_B --batch-size 4 --remat none \
      --layer-loop unrolled --param-dtype bfloat16 --skip-torch ;;
    2b_fsdp2_bf16_remat_none_gather_step_b8) XLA_FLAGS=$LHS run $name ${T:-290} $TWO_B --batch-size 8 --remat none \
      --layer-loop unrolled --mesh 2 --skip-torch --param-dtype bfloat16 --fsdp-gather step ;;
    2b_fsdp2_bf16_remat_none_gather_step) XLA_FLAGS=$LHS run $name ${T:-290} $TWO_B --batch-size 4 --remat none \
      --layer-loop unrolled --mesh 2 --skip-torch --param-dtype bfloat16 --fsdp-gather step ;;
    # under lax.scan, with XLA's collective pipelining across loop iterations instead
    2b_fsdp2_scan) XLA_FLAGS=$PIPE run $name ${T:-120} $TWO_B --batch-size 4 --remat dots_attn --mesh 2 --skip-torch ;;
    # 8B LoRA (rank 32 on attention + MLP of the text decoder), frozen base in bf16
    8b_lora) CUDA_VISIBLE_DEVICES=0 run $name ${T:-150} --like qwen3_vl_8b --lora --batch-size 1 --remat dots_attn \
      --attention cudnn_causal --skip-torch ;;
    *) echo "unknown run $name" ;;
  esac
done
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text()); j = d["jax"]; t = d.get("torch", {})
    print(f"{f.stem}: {d['card']} gpus {d['gpus']} B {d['batch_size']} remat {d['remat']} {d.get('layer_loop')} jax {j.get('tokens_per_s', 0):.0f} tok/s mfu {j.get('mfu', 0):.3f} "
          f"peak {j.get('peak_memory_gib', 0):.1f}GiB compile {j.get('compile_s', 0):.0f}s vision {j.get('vision_fwd_bwd_s', 0):.3f}s slots {j.get('vision_slots')} attn {j.get('attention_used')} | "
          f"torch {t.get('tokens_per_s', 0):.0f} tok/s mfu {t.get('mfu', 0):.3f} | x{d.get('speedup_vs_torch', 0):.2f} "
          f"(each step waited for: jax {j.get('tokens_per_s_synced', 0):.0f} torch {t.get('tokens_per_s_synced', 0):.0f} "
          f"x{d.get('speedup_vs_torch_synced', 0):.2f})")
EOF
