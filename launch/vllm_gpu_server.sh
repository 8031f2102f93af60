#!/usr/bin/env bash
# The GPU side of a disaggregated run: a vLLM server that a trainer on other hosts (Cloud TPU)
# renders and samples from, and streams its weights into every step.
#
#   export JAXRL_VL_SERVER_TOKEN=$(openssl rand -hex 32)     # share it with the trainer, never on argv
#   bash launch/vllm_gpu_server.sh --model /models/qwen3_vl_2b --host 10.128.0.12 [--port 8000] \
#       [--served-model-name policy] [--max-model-len 8192] [--gpu-memory-utilization 0.85] \
#       [--tensor-parallel-size 1] [--weight-backend jaxrl_stream|none] [--device gpu|cpu] [-- EXTRA VLLM ARGS]
#
# Security (the dev-mode routes can pause the engine, replace its weights and call worker methods):
#   - --host must be a private (RFC 1918 / ULA) or loopback address; 0.0.0.0 and public IPs are refused.
#     Put the GPU host and the TPU VMs on one VPC and open --port only to the TPU VMs' range.
#   - Every route except /health needs `Authorization: Bearer $JAXRL_VL_SERVER_TOKEN`: vLLM's
#     VLLM_API_KEY covers /v1 and /inference, launch/vllm_token_auth.py covers the rest (/pause,
#     /collective_rpc, the weight-transfer routes). The token travels in the environment, not argv.
#   - Traffic is plain HTTP: keep it inside the private network (or tunnel it, e.g. IAP / WireGuard).
# The vLLM executable: $VLLM_BIN, else .venv-vllm/bin/vllm-serve-jaxrl (tools/install_vllm.sh;
# VLLM_TARGET=gpu on a CUDA host), else `vllm` on PATH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"

model="" host="" port=8000 name=policy max_model_len=8192 max_num_seqs=64 gpu_mem=0.85 tp=1
backend=jaxrl_stream device=gpu max_images=8 dtype=""
extra=()
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --served-model-name) name="$2"; shift 2 ;;
    --max-model-len) max_model_len="$2"; shift 2 ;;
    --max-num-seqs) max_num_seqs="$2"; shift 2 ;;
    --max-images-per-prompt) max_images="$2"; shift 2 ;;
    --gpu-memory-utilization) gpu_mem="$2"; shift 2 ;;
    --tensor-parallel-size) tp="$2"; shift 2 ;;
    --weight-backend) backend="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; usage 2 ;;
  esac
done
[ -n "$model" ] || { echo "error: --model DIR_OR_HF_ID is required" >&2; exit 2; }
[ -n "$host" ] || { echo "error: --host PRIVATE_IP is required (the address the trainer reaches, e.g. 10.128.0.12)" >&2; exit 2; }
case "$device" in gpu|cpu) ;; *) echo "error: --device=$device: expected gpu or cpu" >&2; exit 2 ;; esac

if [ -n "${VLLM_BIN:-}" ]; then vllm_bin="$VLLM_BIN"
elif [ -x "$repo/.venv-vllm/bin/vllm-serve-jaxrl" ]; then vllm_bin="$repo/.venv-vllm/bin/vllm-serve-jaxrl"
elif command -v vllm >/dev/null; then vllm_bin="$(command -v vllm)"
else echo "error: no vLLM found: run VLLM_TARGET=$device bash tools/install_vllm.sh, or set VLLM_BIN" >&2; exit 2
fi
vllm_python="$(head -1 "$vllm_bin" | sed -n 's/^#!//p')"
[ -x "${vllm_python:-}" ] || vllm_python=python3

# Refuse wildcard and public addresses, and a missing/short token, before starting anything.
"$vllm_python" - "$host" <<'PY'
import ipaddress, sys
host = sys.argv[1]
try:
    address = ipaddress.ip_address(host)
except ValueError:
    sys.exit(f"error: --host={host!r}: give an IP address (the private interface's), not a name")
if address.is_unspecified:
    sys.exit(f"error: --host={host}: binds every interface; give the private interface's address")
if not (address.is_private or address.is_loopback) or address.is_link_local:
    sys.exit(f"error: --host={host} is not a private or loopback address; the dev-mode routes must not face the internet")
PY
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$vllm_python" -c '
import sys, vllm_token_auth
try:
    vllm_token_auth._token_digest()
except RuntimeError as error:
    sys.exit(f"error: {error}")' || exit 2

args=(serve "$model" --host "$host" --port "$port" --served-model-name "$name"
      --max-model-len "$max_model_len" --max-num-seqs "$max_num_seqs"
      --limit-mm-per-prompt "{\"image\": $max_images, \"video\": 0}"
      --enable-scale-out --seed 0 --generation-config vllm
      --enable-auto-tool-choice --tool-call-parser hermes
      --middleware vllm_token_auth.RequireBearerToken)
if [ "$backend" != none ]; then
  # jaxrl_stream comes from plugins/vllm_weight_stream (a vllm.general_plugins entry point).
  if [ "$backend" = jaxrl_stream ] && ! "$vllm_python" -c '
import sys
from importlib.metadata import entry_points
sys.exit(not any(e.name == "jaxrl_vl_weight_stream" for e in entry_points(group="vllm.general_plugins")))'; then
    echo "error: the jaxrl_stream weight-transfer plugin is not installed in $vllm_python's environment:" >&2
    echo "  VLLM_TARGET=$device bash tools/install_vllm.sh (installs it), or $vllm_python -m pip install $repo/plugins/vllm_weight_stream" >&2
    exit 2
  fi
  args+=(--weight-transfer-config "{\"backend\": \"$backend\"}")
fi
if [ "$device" = gpu ]; then
  args+=(--dtype "${dtype:-auto}" --gpu-memory-utilization "$gpu_mem" --tensor-parallel-size "$tp")
else
  args+=(--dtype "${dtype:-float32}" --enforce-eager)
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
fi

export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_API_KEY="$JAXRL_VL_SERVER_TOKEN"   # /v1 and /inference
export VLLM_SERVER_DEV_MODE=1                  # pause/resume, collective_rpc, weight-transfer routes
# our plugins (plugins/vllm_weight_stream): vLLM loads endpoint plugins (the one-request weight-push
# routes) only when VLLM_PLUGINS names them, and then no general plugin it does not name
export VLLM_PLUGINS="${VLLM_PLUGINS:+$VLLM_PLUGINS,}jaxrl_vl_weight_stream,jaxrl_vl_weight_push"
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
echo "[vllm_gpu_server] $vllm_bin ${args[*]} ${extra[*]:-}" >&2
exec "$vllm_bin" "${args[@]}" "${extra[@]}"
