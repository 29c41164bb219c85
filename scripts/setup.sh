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
"$PY" -m pip install -q -e ".[worker,dicom,postgres,flower,dev]"
# Headless Chromium (Debian's package) for the test that opens `segq report`'s page in a real browser.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian package) for the report test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# dicom3tools (Debian's package) for dciodvfy, the independent validator the DICOM SEG test runs.
if ! command -v dciodvfy >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing dicom3tools (Debian package) for the DICOM SEG validation test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null
fi
