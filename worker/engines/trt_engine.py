"""TensorRT runtime adapter: one execution context per worker process, torch CUDA tensors bound by pointer.

Buffers and the stream come from PyTorch (docs/DESIGN.md: no PyCUDA, no second CUDA context): the input
and output are torch tensors whose ``data_ptr()`` TensorRT reads and writes, and the plan runs with
``execute_async_v3`` on torch's current stream, so the slab loop's accumulation that follows is
ordered after it without a host synchronisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from segq.errors import EngineError
from worker.engines.plans import PlanMeta, Profile, chunk_batch, io_names
from worker.engines.trt_build import tensorrt_module

logger = logging.getLogger("segq.engine.tensorrt")


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise EngineError(f"plan tensor type {dtype} is not float32/float16/bfloat16; re-export with segq export-onnx")
    return table[dtype]


class TensorRTEngine:
    """Runs a deserialized plan on batches of ROIs; batches beyond the profile are split, short ones padded."""

    backend = "tensorrt"

    def __init__(self, plan: Path, meta: PlanMeta, device: torch.device) -> None:
        if device.type != "cuda":
            raise EngineError("SEGQ_BACKEND=tensorrt needs a CUDA device; set SEGQ_DEVICE=cuda:0 or auto")
        trt = tensorrt_module()
        self.trt = trt
        self.device = device
        self.precision = meta.precision
        self.plan = plan
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if self.engine is None:
                raise EngineError(f"TensorRT could not deserialize {plan} (see its log); rebuild it with "
                                  "`segq build-engine`")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name, self.output_name = io_names(
            (n, self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT) for n in names)
        lo, opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.profile = Profile(int(lo[0]), int(opt[0]), int(hi[0]))
        self.sample = tuple(int(d) for d in hi[1:])
        self.input_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        logger.info("TensorRT plan %s: %s %s -> %s, batch %d..%d", plan.name, self.input_name, self.sample,
                    self.output_name, self.profile.min, self.profile.max)

    def _run(self, x: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
        ctx = self.context
        if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
            raise EngineError(f"TensorRT refused input shape {tuple(x.shape)} (profile batch "
                              f"{self.profile.min}..{self.profile.max}, ROI {self.sample})")
        out_shape = tuple(ctx.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=self.output_dtype, device=self.device)
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        ctx.set_tensor_address(self.output_name, out.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT execute_async_v3 failed on plan {self.plan.name}")
        return out

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[1:]) != self.sample:
            raise EngineError(f"batch of shape {tuple(batch.shape)} does not fit the plan's ROI {self.sample}")
        x = batch.to(device=self.device, dtype=self.input_dtype).contiguous()
        stream = torch.cuda.current_stream(self.device)
        parts = []
        for lo, hi, size in chunk_batch(x.shape[0], self.profile):
            chunk = x[lo:hi]
            if size > hi - lo:  # below the profile's minimum: pad with zeros, keep only the real ROIs
                chunk = torch.cat([chunk, chunk.new_zeros((size - (hi - lo), *chunk.shape[1:]))])
            parts.append(self._run(chunk.contiguous(), stream)[: hi - lo])
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.float()
