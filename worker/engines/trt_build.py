"""Build a TensorRT plan from the exported ONNX file, as ``trtexec --onnx --saveEngine --fp16
--minShapes --optShapes --maxShapes`` does, through TensorRT's Python builder API (10.x and 11.x).

TensorRT is imported only inside functions: this module loads (and its plain helpers are tested)
where TensorRT is not installed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from segq.errors import EngineError
from worker.engines.plans import INPUT_NAME, PlanMeta, PlanTarget, Profile

logger = logging.getLogger("segq.engine.trt_build")

INSTALL_HINT = ("install it from NVIDIA's package index (pip install tensorrt --extra-index-url "
                "https://pypi.nvidia.com, matching your CUDA)")
BACKEND_NEEDS = "SEGQ_BACKEND=tensorrt needs TensorRT (or set SEGQ_BACKEND=torch)"

Report = Callable[[str], None]


def tensorrt_module(need: str = BACKEND_NEEDS) -> ModuleType:
    """``import tensorrt``, or EngineError saying who needs it and how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(f"{need}, and it is not installed ({exc}): {INSTALL_HINT}") from exc
    return tensorrt


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def current_target(device_index: int = 0) -> PlanTarget:
    """The GPU and TensorRT version of this process: what a plan built or loaded here is bound to."""
    import torch

    trt = tensorrt_module()
    if not torch.cuda.is_available():
        raise EngineError("TensorRT needs a CUDA GPU and none is visible to this process (check "
                          "CUDA_VISIBLE_DEVICES and nvidia-smi), or set SEGQ_BACKEND=torch SEGQ_DEVICE=cpu")
    major, minor = torch.cuda.get_device_capability(device_index)
    return PlanTarget(torch.cuda.get_device_name(device_index), f"{major}.{minor}", str(trt.__version__))


def network_flags(trt: Any, strongly_typed: bool) -> int:
    """Creation flags: EXPLICIT_BATCH only before TensorRT 10 (where it became the only mode and
    deprecated), STRONGLY_TYPED for a graph whose precision is in the graph (always on in 11)."""
    flags = 0
    if trt_major(trt.__version__) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def precision_plan(onnx_precision: str, precision: str, has_fp16_flag: bool) -> tuple[bool, bool]:
    """(strongly_typed, set_fp16_flag) for a build of ``precision`` from an ONNX exported in ``onnx_precision``.

    An fp16 ONNX (network in fp16 inside the graph, float32 in and out) builds strongly typed on any
    TensorRT. An fp32 ONNX builds fp16 only where BuilderFlag.FP16 still exists (TensorRT 10).
    """
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"TensorRT plans are built in fp32 or fp16, not {precision!r}")
    if onnx_precision == "fp16":
        if precision != "fp16":
            raise EngineError("this ONNX file holds an fp16 network; build it with --fp16, or export an fp32 "
                              "ONNX (segq export-onnx --precision fp32) for an fp32 plan")
        return True, False
    if precision == "fp32":
        return True, False
    if not has_fp16_flag:
        raise EngineError("this TensorRT has no BuilderFlag.FP16 (removed in TensorRT 11, which builds strongly "
                          "typed networks only): export an fp16 ONNX with `segq export-onnx --precision fp16` and "
                          "build that")
    return False, True


class _Spinner:
    """Fallback progress for TensorRT builds without IProgressMonitor: a line every few seconds."""

    def __init__(self, report: Report, every: float = 5.0) -> None:
        self.report, self.every = report, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segq-trt-spinner", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        for mark in itertools.cycle("|/-\\"):
            if self._stop.wait(self.every):
                return
            self.report(f"{mark} building TensorRT plan ... {time.monotonic() - started:.0f} s")

    def __enter__(self) -> _Spinner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _progress_monitor(trt: Any, report: Report) -> Any | None:
    """A trt.IProgressMonitor that reports each top-level phase and its steps, where TensorRT has one."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # type: ignore[misc]
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                report(f"TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            total = self.steps.get(phase_name, 0)
            if total >= 10 and (step + 1) % max(total // 10, 1) == 0:
                report(f"TensorRT: {phase_name} {step + 1}/{total}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)

    return Monitor()


def parse_onnx(trt: Any, builder: Any, onnx: Path, strongly_typed: bool, trt_logger: Any) -> tuple[Any, Any]:
    network = builder.create_network(network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx}: {errors}")
    return network, parser


def build_plan(onnx: Path, precision: str, profile: Profile, workspace_gb: float, onnx_precision: str = "fp32",
               report: Report | None = None) -> bytes:
    """Serialized plan bytes for ``onnx`` on this GPU, with a dynamic batch profile."""
    trt = tensorrt_module()
    report = report or logger.info
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    strongly_typed, fp16_flag = precision_plan(onnx_precision, precision, hasattr(trt.BuilderFlag, "FP16"))
    network, _parser = parse_onnx(trt, builder, onnx, strongly_typed, trt_logger)
    input_tensor = network.get_input(0)
    if input_tensor.name != INPUT_NAME:
        logger.warning("ONNX input is named %r, not %r", input_tensor.name, INPUT_NAME)
    sample = tuple(int(d) for d in input_tensor.shape[1:])
    if any(d < 1 for d in sample):
        raise EngineError(f"only the batch axis may be dynamic; {onnx} has input shape {tuple(input_tensor.shape)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_tensor.name, *profile.shapes(sample))
    config.add_optimization_profile(opt_profile)
    monitor = _progress_monitor(trt, report)
    started = time.monotonic()
    report(f"building a {precision} TensorRT plan from {onnx.name}, batch {profile.min}..{profile.max} "
           f"(opt {profile.opt}), workspace {workspace_gb:g} GiB; this takes minutes")
    if monitor is not None:
        config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
    else:
        with _Spinner(report):
            serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build a plan from {onnx} (see its log above); try a larger "
                          "--workspace-gb or a smaller --max-batch")
    report(f"plan built in {time.monotonic() - started:.0f} s")
    return bytes(serialized)


def new_meta(onnx_sha256: str, target: PlanTarget, precision: str, profile: Profile,
             model_sha256: str | None, seconds: float) -> PlanMeta:
    return PlanMeta(onnx_sha256=onnx_sha256, plan_sha256="", gpu_name=target.gpu_name,
                    compute_capability=target.compute_capability, trt_version=target.trt_version,
                    precision=precision, profile={"min": profile.min, "opt": profile.opt, "max": profile.max},
                    model_sha256=model_sha256, build_seconds=round(seconds, 1))
