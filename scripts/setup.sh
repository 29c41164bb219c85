#!/usr/bin/env bash
# Install segq with its worker and test dependencies into the current Python environment.
# torch is installed first and pinned to a CPU build where one is at hand: a bare `torch`
# requirement resolved from scratch pulls a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "installing torch (CPU build where available)"
  "$PY" -m pip install -q "torch==${SEGQ_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[worker,postgres,flower,dev]"
