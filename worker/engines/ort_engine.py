"""ONNX Runtime engine: the exported graph on the CUDA provider where the installed build has it, else the CPU.

On CUDA the session reads and writes torch tensors in place (I/O binding by pointer), so results stay
on the GPU like every other engine's. On the CPU provider a batch goes in as numpy and the result is
moved to the engine's device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segq.errors import EngineError
from worker.engines.plans import INPUT_NAME, OUTPUT_NAME

logger = logging.getLogger("segq.engine.onnxruntime")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def onnxruntime_module() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineError(f"SEGQ_BACKEND=onnxruntime but onnxruntime is not installed ({exc}): pip install "
                          "onnxruntime (CPU) or onnxruntime-gpu (CUDA)") from exc
    return onnxruntime


def choose_providers(available: list[str], device_type: str, index: int, precision: str) -> list[Any]:
    """Providers for the device: CUDA (then CPU as fallback for unsupported nodes) or the CPU alone."""
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"the onnxruntime backend runs fp32 or fp16 graphs, not {precision!r}; "
                          "set SEGQ_PRECISION=fp32 or fp16")
    if device_type == "cuda" and CUDA_PROVIDER in available:
        return [(CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER]
    if precision == "fp16":
        raise EngineError(f"SEGQ_PRECISION=fp16 with onnxruntime needs its CUDA provider; this build has "
                          f"{', '.join(available)}: pip install onnxruntime-gpu, or set SEGQ_PRECISION=fp32")
    return [CPU_PROVIDER]


class OnnxRuntimeEngine:
    backend = "onnxruntime"

    def __init__(self, onnx: Path, device: torch.device, precision: str = "fp32") -> None:
        ort = onnxruntime_module()
        self.device = device
        self.precision = precision
        providers = choose_providers(list(ort.get_available_providers()), device.type, device.index or 0, precision)
        self.on_cuda = providers[0] != CPU_PROVIDER
        if device.type == "cuda" and not self.on_cuda:
            logger.warning("this onnxruntime build has no CUDA provider: running on the CPU, results moved to %s",
                           device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx), sess_options=options, providers=providers)
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != ([INPUT_NAME], [OUTPUT_NAME]):
            raise EngineError(f"{onnx} has inputs {names[0]} and outputs {names[1]}, expected [{INPUT_NAME!r}] and "
                              f"[{OUTPUT_NAME!r}]: export it with `segq export-onnx`")
        logger.info("onnxruntime session on %s for %s", self.session.get_providers()[0], onnx.name)

    def _run_cuda(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        # ONNX Runtime runs on its own stream: the input must be complete before it starts.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return out

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            return self._run_cuda(batch.to(device=self.device, dtype=torch.float32).contiguous())
        host = batch.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        result = self.session.run([OUTPUT_NAME], {INPUT_NAME: host})[0]
        return torch.from_numpy(np.ascontiguousarray(result)).to(self.device)
