#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools. Idempotent: a second run is quick.
# torch is not pinned by the project: on a CUDA machine pip takes the CUDA build from PyPI; here the
# machine's pip constraint serves torch/torchvision from local files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    echo "python3 -m venv failed: installing python3-venv (Debian)" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv
    "$PY" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[dev]"
