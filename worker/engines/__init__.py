"""Inference engines, chosen by configuration: torch, onnxruntime or tensorrt."""

from __future__ import annotations

import torch

from segq.errors import EngineError
from segq.modelspec import ModelSpec
from worker.engines.base import Engine

__all__ = ["Engine", "create_engine", "pick_device"]


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes the (only visible) GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"SEGQ_DEVICE={name} but no CUDA device is visible to this process")
    return device


def create_engine(spec: ModelSpec, backend: str, precision: str, device: torch.device,
                  compile: bool = False) -> Engine:
    """The engine for ``backend``; raises EngineError saying what is missing when it cannot load."""
    if backend == "torch":
        from worker.engines.torch_engine import TorchEngine

        return TorchEngine(spec, device, precision, compile=compile)
    raise EngineError(f"backend {backend!r} is not available in this build; use SEGQ_BACKEND=torch")
