"""Inference engines, chosen by configuration: torch, onnxruntime or tensorrt.

Every engine follows ``base.Engine``: float32 ROIs in, float32 target-class probability out, both
on the engine's device. ONNX Runtime and TensorRT engines are made from files cached per model under
``SEGQ_STORAGE/engines`` (``cache.py``), exported or built on first use unless SEGQ_ENGINE_BUILD=false.
"""

from __future__ import annotations

import torch

from segq.errors import EngineError
from segq.modelspec import ModelSpec
from segq.settings import Settings, get_settings
from worker.engines.base import Engine
from worker.engines.startup import StartClock

__all__ = ["Engine", "compile_mode", "create_engine", "pick_device"]

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes the (only visible) GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"SEGQ_DEVICE={name} but no CUDA device is visible to this process")
    return device


def compile_mode(setting: str, precision: str, device: torch.device) -> str | None:
    """The torch.compile mode SEGQ_TORCH_COMPILE asks for here, None for eager.

    ``auto`` compiles fp16 on a GPU, the combination measured faster than the tuned MONAI loop with masks
    that agree (docs/BENCHMARKS.md); fp32, bf16 and CPU workers stay eager unless a mode is named. How an
    ``auto`` engine compiles (regionally or whole) the engine decides from its network (compiling.choose).
    """
    if setting == "auto":
        return "auto" if precision == "fp16" and device.type == "cuda" else None
    return None if setting == "off" else setting


def create_engine(spec: ModelSpec, backend: str, precision: str, device: torch.device,
                  compile_mode: str | None = None, settings: Settings | None = None,
                  model_sha256: str | None = None, clock: StartClock | None = None) -> Engine:
    """The engine for ``backend``; raises EngineError saying what is missing when it cannot load. ``clock`` times
    a torch engine's start."""
    settings = settings or get_settings()
    if backend == "torch":
        from worker.engines.torch_engine import TorchEngine

        return TorchEngine(spec, device, precision, compile_mode, engine_root=settings.engine_root,
                           model_sha256=model_sha256, inductor_dir=settings.inductor_root, clock=clock)
    if backend == "onnxruntime":
        from worker.engines.cache import ensure_onnx
        from worker.engines.ort_engine import OnnxRuntimeEngine, onnxruntime_module

        onnxruntime_module()  # fail with the install hint before exporting anything
        onnx = ensure_onnx(spec, precision, settings.engine_root, model_sha256, settings.engine_build)
        return OnnxRuntimeEngine(onnx, device, precision)
    if backend == "tensorrt":
        from worker.engines.cache import ensure_plan
        from worker.engines.trt_engine import TensorRTEngine

        plan, meta = ensure_plan(spec, precision, settings, device, model_sha256)
        return TensorRTEngine(plan, meta, device)
    raise EngineError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}; set SEGQ_BACKEND to one of them")
