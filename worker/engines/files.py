"""Where an engine's files live, and the lock that makes workers which start together build each one once.

Everything a worker builds for a model (ONNX exports, TensorRT plans, AOT packages, the accuracy gate's
verdicts and its fp32 reference) lies under ``SEGQ_ENGINE_DIR/<model>/``. This module owns only the layout
and the lock, below every module that builds a file, so none of them imports another to find its folder.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

LOCK_TIMEOUT = 3 * 3600  # a SwinUNETR plan builds in minutes; an hour-long wait means a stuck builder


def model_dir(root: Path, model_sha256: str) -> Path:
    return root / model_sha256[:16]


def build_lock(path: Path) -> FileLock:
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT)
