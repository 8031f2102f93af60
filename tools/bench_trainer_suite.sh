#!/usr/bin/env bash
# The trainer-path GPU runs behind README "Performance" (issue 21), in one machine start: launch/train.py itself
# (tools/bench_trainer.py) next to the step benchmark (tools/bench_train.py, with transformers + liger-kernel)
# on the same row shapes. Usage on the device machine, from the repo root:
#   OUT=/some/dir RUNS='setup sft_4img bench_4img ...' [LOOP=unrolled|scan] bash tools/bench_trainer_suite.sh
# Carried wheels in .whl/ (grain, array-record, portpicker, ml-collections, liger-kernel) are installed by `setup`.
# Every run writes OUT/<name>.json (its last JSON line) and OUT/<name>.log and has its own time limit.
set -u
OUT=${OUT:-/tmp/bench_out}
WORK=${WORK:-/tmp/bench_work}
LOOP=${LOOP:-unrolled}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
M2B=$WORK/qwen3_vl_2b
M8B=$WORK/qwen3_vl_8b
COMMON="--config.model.path=$M2B --config.model.layer_loop=$LOOP"

run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? $(date -u +%T)"
  grep -E '^\{' "$OUT/$name.log" | tail -1 > "$OUT/$name.json"
  grep -E 'Error|error:' "$OUT/$name.log" | tail -3 | cut -c1-300
}

for name in ${RUNS:-setup sft_4img bench_4img}; do
  case $name in
    setup)
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      [ -d "$M2B" ] || $PY tools/make_tiny_model.py --like qwen3_vl_2b --out "$M2B" | tail -1
      [ -d "$WORK/chat4" ] || $PY tools/make_bench_data.py --out "$WORK/chat4" --layout chat --images 4 --rows 48
      [ -d "$WORK/folder" ] || $PY tools/make_bench_data.py --out "$WORK/folder" --layout image_folder --rows 600
      [ -d "$WORK/rollouts" ] || $PY tools/make_replay_rollouts.py --model "$M2B" --out "$WORK/rollouts" --steps 8 \
        --groups 1 --samples 2 --seq-len 4096 --images 4 --image-size 448 ;;
    # launch/train.py SFT, rows of 4096 tokens with four 448px images each (one record per row, loss on the answer)
    sft_4img) run $name 420 $PY tools/bench_trainer.py --config configs/gpu.py:sft_2b --steps ${STEPS:-10} -- \
      $COMMON --config.data.path=$WORK/chat4 ;;
    # the step benchmark on the same shape, with transformers + liger-kernel in the same call
    bench_4img) run $name 420 $PY tools/bench_train.py --like qwen3_vl_2b --batch-size 2 --remat none \
      --layer-loop $LOOP --param-dtype bfloat16 --attention cudnn_causal --steps 4 --torch-liger ;;
    bench_4img_torch) run $name 300 $PY tools/bench_torch.py --like qwen3_vl_2b --batch-size 2 --steps 4 ;;
    # image-heavy rows: single-image records packed into 4096-token rows (~18 images per row), cuDNN with segments
    sft_18img) run $name 420 $PY tools/bench_trainer.py --config configs/gpu.py:sft_2b --steps ${STEPS:-10} -- \
      $COMMON --config.data.source=image_folder --config.data.path=$WORK/folder --config.data.packing=true \
      --config.model.attention=cudnn ;;
    # the RL update (old-policy scoring + PPO update) of the GPU RL preset on recorded 4096-token, 4-image episodes
    rl_4img) run $name 420 $PY tools/bench_trainer.py --config configs/gpu.py:rl_2b --steps 6 -- $COMMON \
      --config.rl.replay_rollouts_from=$WORK/rollouts --config.rl.eval_episodes=0 --config.rl.num_groups=1 \
      --config.rl.samples_per_group=2 ;;
    *) echo "unknown run $name" ;;
  esac
done
for f in "$OUT"/*.json; do echo "$(basename "$f"): $(head -c 1500 "$f")"; done
