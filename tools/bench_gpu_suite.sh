#!/usr/bin/env bash
# The GPU benchmark runs behind the README's performance section, in one go (one machine start).
# Needs 2 GPUs for the FSDP run; the single-GPU runs use GPU 0 only. Usage:
#   OUT=/some/dir bash tools/bench_gpu_suite.sh
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
# 1. 2B full fine-tune on one H100 vs transformers + PyTorch (same batch: 2 x 4096 tokens, 4 x 448px images/row)
CUDA_VISIBLE_DEVICES=0 run qwen3_vl_2b_1gpu ${T1:-230} --like qwen3_vl_2b --batch-size 2 --remat dots \
  --attention cudnn_causal
# 2. the same model, FSDP over two GPUs, 2 rows per GPU
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" run qwen3_vl_2b_fsdp2 ${T2:-150} --like qwen3_vl_2b \
  --batch-size 4 --remat dots --attention cudnn_causal --mesh 2 --skip-torch
# 3. 8B LoRA on one H100
CUDA_VISIBLE_DEVICES=0 run qwen3_vl_8b_lora ${T3:-150} --like qwen3_vl_8b --lora --batch-size 1 --remat dots \
  --attention cudnn_causal --skip-torch
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text()); j = d["jax"]; t = d.get("torch", {})
    print(f"{f.stem}: jax {j.get('tokens_per_s', 0):.0f} tok/s mfu {j.get('mfu', 0):.3f} "
          f"peak {j.get('peak_memory_gib', 0):.1f}GiB compile {j.get('compile_s', 0):.0f}s attn {j.get('attention_used')} | "
          f"torch {t.get('tokens_per_s', 0):.0f} tok/s mfu {t.get('mfu', 0):.3f} | x{d.get('speedup_vs_torch', 0):.2f}")
EOF
