#!/usr/bin/env bash
# Install torch==2.13.0 into the venv of $1 unless some torch is already there, without ever pulling a
# multi-GB CUDA build onto a machine that has no GPU.
set -euo pipefail
PY="$1"
if "$PY" -c "import torch" 2>/dev/null; then
  exit 0
fi
if ls /opt/wheels/torch-2.13.0*cpu* >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0 --find-links /opt/wheels   # the local CPU wheel
elif command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0                            # a GPU machine: the CUDA build is wanted
else
  "$PY" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
