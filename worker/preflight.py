"""Checks a GPU worker runs before Celery starts: the configured backend must be able to load here.

A worker that cannot build its engine would otherwise take tasks and fail each of them; this turns
that into one clear line at start. The model itself is only known when a job arrives, so what is
checked is the stack (packages, GPU, precision) and, where building is off, that plans exist.

The Celery parent forks its pool after this runs, and CUDA must not be initialised before a fork
(docs/DESIGN.md), so whatever needs the GPU is asked of a short child process instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from typing import Any

from segq.errors import EngineError
from segq.names import GPU_QUEUE
from segq.settings import Settings

logger = logging.getLogger("segq.preflight")

GPU_HINT = "none is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
_PROBE = """
import json, sys
import torch
out = {"cuda": torch.cuda.is_available()}
if out["cuda"]:
    index = 0 if sys.argv[1] == "auto" else (torch.device(sys.argv[1]).index or 0)
    out["name"] = torch.cuda.get_device_name(index)
    out["capability"] = "%d.%d" % torch.cuda.get_device_capability(index)
try:
    import tensorrt
    out["trt"] = str(tensorrt.__version__)
except ImportError as exc:
    out["trt_error"] = str(exc)
print(json.dumps(out))
"""


def serves_gpu_queue(queues: str | None) -> bool:
    """A worker started without -Q consumes every queue, GPU ones included."""
    if not queues:
        return True
    return any(q.strip() == GPU_QUEUE or q.strip().startswith(GPU_QUEUE + ".") for q in queues.split(","))


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise EngineError(hint)


def probe_gpu(device: str) -> dict[str, Any]:
    """What a fresh process sees of the GPU and TensorRT (this one stays free of CUDA)."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, device], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise EngineError("the GPU probe did not answer in 300 s: check nvidia-smi") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineError(f"the GPU probe failed ({last}); check the torch install and nvidia-smi")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def needs_gpu(settings: Settings) -> bool:
    return (settings.backend == "tensorrt" or settings.precision == "fp16"
            or settings.device.startswith("cuda"))


def preflight(settings: Settings, queues: str | None = None) -> None:
    """Raise EngineError (one line: what is missing and how to get it) if the engine cannot load."""
    if not serves_gpu_queue(queues) or settings.backend == "simulate":  # simulated parts need no engine
        return
    backend, precision = settings.backend, settings.precision
    _require("torch", "the worker needs PyTorch: pip install 'segq[worker]' (a CPU or CUDA build of torch)")
    _require("monai", "the worker needs MONAI: pip install 'segq[worker]'")
    if backend == "onnxruntime":
        _require("onnxruntime", "SEGQ_BACKEND=onnxruntime but onnxruntime is not installed: pip install "
                                "onnxruntime (CPU) or onnxruntime-gpu (CUDA)")
        _require("onnx", "SEGQ_BACKEND=onnxruntime exports the model with onnx: pip install onnx")
    on_cpu = settings.device == "cpu"
    gpu = probe_gpu(settings.device) if needs_gpu(settings) and not on_cpu else {}
    if needs_gpu(settings) and not gpu.get("cuda"):
        what = ("SEGQ_BACKEND=tensorrt" if backend == "tensorrt" else
                "SEGQ_PRECISION=fp16" if precision == "fp16" else f"SEGQ_DEVICE={settings.device}")
        fixes = {"SEGQ_BACKEND=tensorrt": "set SEGQ_BACKEND=torch",
                 "SEGQ_PRECISION=fp16": "on a CPU worker set SEGQ_PRECISION=fp32 or bf16"}
        fix = fixes.get(what, "set SEGQ_DEVICE=auto")
        where = "but SEGQ_DEVICE=cpu" if on_cpu else f"and {GPU_HINT}"
        raise EngineError(f"{what} needs a CUDA GPU {where}; {fix}")
    if backend == "onnxruntime":
        _check_onnxruntime(bool(gpu.get("cuda")) or settings.device.startswith("cuda"), precision)
    elif backend == "tensorrt":
        _check_tensorrt(settings, gpu)
    logger.info("preflight: the %s %s engine can load here", backend, precision)


def _check_onnxruntime(cuda: bool, precision: str) -> None:
    import onnxruntime

    from worker.engines.ort_engine import choose_providers

    choose_providers(list(onnxruntime.get_available_providers()), "cuda" if cuda else "cpu", 0, precision)


def _check_tensorrt(settings: Settings, gpu: dict[str, Any]) -> None:
    from worker.engines.plans import PLAN_PRECISIONS, PlanTarget, plans_for
    from worker.engines.trt_build import BACKEND_NEEDS, INSTALL_HINT

    if "trt" not in gpu:
        raise EngineError(f"{BACKEND_NEEDS}, and it is not installed ({gpu.get('trt_error')}): {INSTALL_HINT}")
    if settings.precision not in PLAN_PRECISIONS:
        raise EngineError(f"TensorRT plans are built in {' or '.join(PLAN_PRECISIONS)}; set SEGQ_PRECISION to one")
    target = PlanTarget(gpu["name"], gpu["capability"], gpu["trt"])
    if not settings.engine_build and not plans_for(settings.engine_root, target):
        raise EngineError(f"no TensorRT plan for {target.gpu_name} (sm {target.compute_capability}, TensorRT "
                          f"{target.trt_version}) under {settings.engine_root} and SEGQ_ENGINE_BUILD=false: run "
                          "`segq export-onnx` and `segq build-engine` on this machine, or set SEGQ_ENGINE_BUILD=true")
