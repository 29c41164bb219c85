"""Export the wrapped model (target-class probability, softmax inside the graph) to ONNX and check it.

The graph takes float32 ``input`` (B, C, *roi) and returns float32 ``probability`` (B, 1, *roi) with a
dynamic batch axis: the file TensorRT builds plans from and ONNX Runtime runs. An fp16 export keeps
float32 in and out and puts the network itself in fp16 inside the graph (what TensorRT 11's strongly
typed builds need). Each export is run in ONNX Runtime against PyTorch before it is kept.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segq import storage
from segq.errors import EngineError
from segq.modelspec import ModelSpec, file_sha256
from worker.engines.model import load_model
from worker.engines.plans import INPUT_NAME, OUTPUT_NAME

logger = logging.getLogger("segq.onnx_export")

OPSET = 17  # LayerNormalization is native from 17; TensorRT 10 and 11 parse it
# Largest |ONNX Runtime - PyTorch fp32| accepted. fp16 graphs are compared with the fp32 model, so
# their bound is the fp16 rounding of a probability, not an exporter tolerance.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


class _CastInput(nn.Module):
    """float32 in, the network's dtype inside: the cast becomes part of the graph."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


@dataclass
class OnnxMeta:
    """The sidecar of an exported ONNX file."""

    model_sha256: str
    onnx_sha256: str
    precision: str
    opset: int
    roi: list[int]
    in_channels: int
    max_abs_diff: float
    arch: str
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    model_path: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> OnnxMeta | None:
        side = sidecar_path(path)
        if not side.is_file():
            return None
        try:
            return cls(**json.loads(side.read_text()))
        except (ValueError, TypeError):
            return None


def sidecar_path(onnx: Path) -> Path:
    return onnx.with_name(onnx.name + ".json")


def onnx_precision(onnx: Path) -> str:
    """The precision recorded at export; fp32 for a file of unknown origin."""
    meta = OnnxMeta.read(onnx)
    return meta.precision if meta else "fp32"


def _export_module(spec: ModelSpec, precision: str) -> nn.Module:
    model = load_model(spec)
    if precision == "fp32":
        return model
    if precision == "fp16":
        model.network.half()
        return _CastInput(model, torch.float16).eval()
    raise EngineError(f"ONNX export supports fp32 or fp16, not {precision!r} (bf16 has no ONNX Runtime CPU kernels)")


def run_onnx_cpu(onnx: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])


def export_onnx(spec: ModelSpec, out: Path, precision: str = "fp32", check_batch: int = 2,
                seed: int = 0) -> OnnxMeta:
    """Export ``spec``'s wrapped model to ``out`` (+ ``out.json``); refuse if ONNX Runtime disagrees with PyTorch.

    The trace uses batch 1 and the check a batch of ``check_batch``, so a batch size baked into
    the graph is caught here rather than in a worker.
    """
    module = _export_module(spec, precision)
    sample = (spec.in_channels, *spec.roi)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns on every traced shape expression
        torch.onnx.export(module, (torch.zeros(1, *sample),), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        _check_graph(tmp)
        diff = _compare(spec, tmp, check_batch, sample, seed)
        tolerance = TOLERANCE[precision]
        if not diff <= tolerance:
            raise EngineError(f"ONNX export refused: ONNX Runtime differs from PyTorch by {diff:.3g} "
                              f"(> {tolerance:g}) on a random batch of {check_batch}; nothing was written")
    meta = OnnxMeta(model_sha256=spec.checksum(), onnx_sha256=file_sha256(out), precision=precision, opset=OPSET,
                    roi=list(spec.roi), in_channels=spec.in_channels, max_abs_diff=float(diff), arch=spec.arch,
                    model_path=str(spec.path) if spec.path else None)
    with storage.atomic_path(sidecar_path(out)) as tmp:
        tmp.write_text(meta.to_json())
    logger.info("exported %s (%s) in %.1f s; ONNX Runtime vs PyTorch max |diff| %.2g", out, precision,
                time.perf_counter() - started, diff)
    return meta


def _check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise EngineError(f"the exported ONNX graph is invalid: {exc}") from exc


def _compare(spec: ModelSpec, onnx: Path, batch: int, sample: tuple[int, ...], seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *sample, generator=generator)
    with torch.inference_mode():
        reference = load_model(spec)(x).numpy()
    ours = run_onnx_cpu(onnx, x.numpy())
    if ours.shape != reference.shape:
        raise EngineError(f"ONNX export refused: output shape {ours.shape} for a batch of {batch}, PyTorch gives "
                          f"{reference.shape} (is the batch axis dynamic?)")
    return float(np.max(np.abs(ours - reference)))
