#!/usr/bin/env bash
# Creates (or refreshes) the trainer's virtualenv in .venv from requirements.txt. Idempotent:
# does nothing when requirements.txt has not changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/pip install -q --no-deps -e .
.venv/bin/python tools/patch_torchvision.py
echo "$want" > "$stamp"
echo "trainer environment ready: .venv"
