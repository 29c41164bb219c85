"""PyTorch engine: the wrapped MONAI network in fp32, fp16 or bf16, optionally torch.compile'd."""

from __future__ import annotations

import logging

import torch

from segq.errors import EngineError
from segq.modelspec import ModelSpec
from worker.model import load_model

logger = logging.getLogger("segq.engine.torch")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchEngine:
    backend = "torch"

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str = "fp32", compile: bool = False) -> None:
        if precision not in DTYPES:
            raise EngineError(f"precision {precision!r} is not one of {', '.join(DTYPES)}")
        if precision == "fp16" and device.type == "cpu":
            raise EngineError("fp16 needs a CUDA device; on a CPU worker set SEGQ_PRECISION=fp32 or bf16")
        self.precision = precision
        self.device = device
        self.dtype = DTYPES[precision]
        model = load_model(spec)
        model.network.to(device=device, dtype=self.dtype)
        self.model: torch.nn.Module = model
        if compile:
            logger.info("compiling the network with torch.compile (takes minutes for SwinUNETR)")
            self.model = torch.compile(model, dynamic=False)  # type: ignore[assignment]

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(device=self.device, dtype=self.dtype)).float()
