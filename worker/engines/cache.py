"""The engine cache under ``SEGQ_STORAGE/engines/<model>/``: ONNX exports and TensorRT plans per GPU.

Every worker on a machine (and every machine with the same GPU and TensorRT) loads what the first
one built. A file lock next to each artefact makes two workers that start together build it once:
the second waits, then finds the file and loads it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from filelock import Timeout

from segq.errors import EngineError
from segq.modelspec import ModelSpec, file_sha256
from segq.settings import Settings
from worker.engines.files import LOCK_TIMEOUT, build_lock, model_dir
from worker.engines.plans import (
    PlanMeta,
    PlanRefusedError,
    PlanTarget,
    Profile,
    check_plan,
    plan_name,
    sidecar_path,
    write_plan,
)

logger = logging.getLogger("segq.engine.cache")


def onnx_file(root: Path, model_sha256: str, precision: str) -> Path:
    return model_dir(root, model_sha256) / f"model-{precision}.onnx"


def _onnx_fits(path: Path, model_sha256: str, precision: str) -> bool:
    from worker.engines.onnx_export import OnnxMeta

    meta = OnnxMeta.read(path)
    return path.is_file() and meta is not None and meta.model_sha256 == model_sha256 and meta.precision == precision


def ensure_onnx(spec: ModelSpec, precision: str, root: Path, model_sha256: str | None = None,
                build: bool = True) -> Path:
    """The cached ONNX export of ``spec`` in ``precision``, exported (once, under a lock) if missing."""
    model_sha256 = model_sha256 or spec.checksum()
    path = onnx_file(root, model_sha256, precision)
    if _onnx_fits(path, model_sha256, precision):
        return path
    if not build:
        raise EngineError(f"no {precision} ONNX export of this model at {path}: run `segq export-onnx --model "
                          f"{spec.path} --precision {precision} -o {path}`, or set SEGQ_ENGINE_BUILD=true")
    from worker.engines.onnx_export import export_onnx

    try:
        with build_lock(path):
            if not _onnx_fits(path, model_sha256, precision):  # another worker may have exported it meanwhile
                logger.info("exporting %s ONNX for model %s to %s", precision, model_sha256[:12], path)
                export_onnx(spec, path, precision)
    except Timeout as exc:
        raise EngineError(f"waited {LOCK_TIMEOUT} s for the lock on {path}; remove {path}.lock if no "
                          "worker is exporting") from exc
    return path


def onnx_precision_for(precision: str, has_fp16_flag: bool) -> str:
    """An fp16 plan comes from the fp32 graph with BuilderFlag.FP16 (TensorRT 10), else from an fp16 graph."""
    return "fp16" if precision == "fp16" and not has_fp16_flag else "fp32"


def build_and_gate(onnx: Path, plan: Path, precision: str, profile: Profile, workspace_gb: float,
                   spec: ModelSpec | None, device: torch.device, reference: np.ndarray | None = None,
                   min_dice: float = 0.99, report: Callable[[str], None] | None = None) -> PlanMeta:
    """Build a plan, check its mask against fp32 PyTorch, and only then move it (and its sidecar) into place."""
    from worker.engines.gate import check_accuracy, reference_volume
    from worker.engines.onnx_export import onnx_precision
    from worker.engines.torch_engine import TorchEngine
    from worker.engines.trt_build import build_plan, current_target, new_meta
    from worker.engines.trt_engine import TensorRTEngine

    target = current_target(device.index or 0)
    started = time.monotonic()
    data = build_plan(onnx, precision, profile, workspace_gb, onnx_precision(onnx), report)
    meta = new_meta(file_sha256(onnx), target, precision, profile, spec.checksum() if spec else None,
                    time.monotonic() - started)
    candidate = plan.with_name(plan.name + ".candidate")
    write_plan(candidate, data, meta)
    try:
        if spec is None:
            logger.warning("no model given: the accuracy gate is skipped for %s", plan.name)
        else:
            engine = TensorRTEngine(candidate, meta, device)
            volume = reference if reference is not None else reference_volume(spec)
            gate = check_accuracy(engine, TorchEngine(spec, device, "fp32"), spec, volume, min_dice)
            meta.accuracy = {**gate.as_dict(), "reference_shape": list(volume.shape)}
            sidecar_path(candidate).write_text(meta.to_json())
        os.replace(sidecar_path(candidate), sidecar_path(plan))
        os.replace(candidate, plan)
    finally:
        candidate.unlink(missing_ok=True)
        sidecar_path(candidate).unlink(missing_ok=True)
    return meta


def ensure_plan(spec: ModelSpec, precision: str, settings: Settings, device: torch.device,
                model_sha256: str | None = None) -> tuple[Path, PlanMeta]:
    """The cached plan for this model, precision and GPU: loaded if it fits, else built once under a lock."""
    from worker.engines.trt_build import current_target, tensorrt_module

    trt = tensorrt_module()
    model_sha256 = model_sha256 or spec.checksum()
    target: PlanTarget = current_target(device.index or 0)
    profile = Profile(settings.trt_min_batch, settings.trt_opt_batch, settings.trt_max_batch)
    plan = model_dir(settings.engine_root, model_sha256) / plan_name(model_sha256, target, precision, profile)
    try:
        return plan, check_plan(plan, target)
    except PlanRefusedError as exc:
        if not settings.engine_build:
            raise EngineError(f"{exc}; or set SEGQ_ENGINE_BUILD=true so the worker builds it") from exc
        logger.warning("%s: building a new plan", exc)
    onnx = ensure_onnx(spec, onnx_precision_for(precision, hasattr(trt.BuilderFlag, "FP16")), settings.engine_root,
                       model_sha256, settings.engine_build)
    try:
        with build_lock(plan):
            try:
                return plan, check_plan(plan, target)  # built by another worker while we waited
            except PlanRefusedError:
                pass
            meta = build_and_gate(onnx, plan, precision, profile, settings.trt_workspace_gb, spec, device,
                                  min_dice=settings.gate_min_dice)
    except Timeout as exc:
        raise EngineError(f"waited {LOCK_TIMEOUT} s for the lock on {plan}; remove {plan}.lock if no worker "
                          "is building") from exc
    return plan, meta
