"""The accuracy gate's verdicts and its fp32 reference mask, kept on disk so that a start pays for neither twice.

The gate runs the engine and fp32 eager PyTorch over a reference volume and compares their masks: for SwinUNETR
on a GPU, a second network, two whole-volume passes and their memory. Both answers are functions of what went
in, so both are kept under ``SEGQ_ENGINE_DIR/<model>/gate/``, named by a digest of everything they depend on:

- a verdict: the engine (backend, precision, compile mode and options, fused attention, ROI batch), the model
  (checkpoint and network config), the reference volume, the machine (PyTorch, CUDA, cuDNN, MONAI, GPU model
  and compute capability) and this file's ``GATE_VERSION``. A start that matches all of them reads the passed
  verdict instead of running the gate; any change (an upgrade, another GPU, a new checkpoint, another mode)
  misses and runs it again.
- the fp32 reference mask: the same less the engine, so every engine kind on a machine compares against one
  reference computed once.

The GPU driver is not in the key: PyTorch does not report its version without NVML. Set SEGQ_GATE_CACHE=false
to run the gate on every start (after a driver upgrade, say).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segq import storage
from segq.modelspec import ModelSpec
from worker.engines.base import Engine
from worker.engines.compiling import REGIONS
from worker.engines.files import model_dir
from worker.engines.gate import check_mask, reference_mask

logger = logging.getLogger("segq.engine.verdicts")

GATE_VERSION = 1  # bump when the gate's rule or reference changes: every kept verdict is then stale


def machine_identity(device: torch.device) -> dict[str, Any]:
    """What on this machine a mask depends on, besides the model: library versions and the hardware."""
    import monai

    identity: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "monai": monai.__version__,
        "device": device.type,
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        identity.update(gpu=torch.cuda.get_device_name(device), capability=f"{major}.{minor}")
    else:
        identity.update(cpu=platform.machine())
    return identity


def model_identity(spec: ModelSpec, model_sha256: str, volume: np.ndarray) -> dict[str, Any]:
    """The model (its checksum covers checkpoint and network config), the settings the gate's slab loop reads,
    and the reference volume's bytes; the model file's paths are left out, which do not change a mask."""
    settings = {key: value for key, value in spec.to_dict().items() if key not in ("path", "checkpoint")}
    return {
        "model": model_sha256,
        "spec": settings,
        "volume": hashlib.sha256(np.ascontiguousarray(volume).tobytes()).hexdigest(),
        "volume_shape": list(volume.shape),
        "gate_version": GATE_VERSION,
    }


def engine_identity(engine: Engine) -> dict[str, Any]:
    """How the engine computes: everything a TorchEngine was built with that can move a voxel."""
    static = getattr(engine, "static", None)
    mode = getattr(engine, "compile_mode", None)
    identity: dict[str, Any] = {
        "backend": engine.backend,
        "precision": engine.precision,
        "compile_mode": mode,
        "batch": static.opt if static is not None else None,
        "fused_attention": getattr(engine, "fused_attention", None),
        "channels_last": getattr(engine, "channels_last", None),
    }
    if mode is not None:
        from worker.engines.torch_engine import compile_options

        identity["options"] = repr(sorted(compile_options("default" if mode == "regional" else mode).items()))
        identity["regions"] = REGIONS if mode == "regional" else None
    return identity


def digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def gate_dir(root: Path, model_sha256: str) -> Path:
    return model_dir(root, model_sha256) / "gate"


def verdict_path(root: Path, model_sha256: str, identity: dict[str, Any]) -> Path:
    return gate_dir(root, model_sha256) / f"verdict-{digest(identity)[:24]}.json"


def reference_path(root: Path, model_sha256: str, identity: dict[str, Any]) -> Path:
    return gate_dir(root, model_sha256) / f"reference-{digest(identity)[:24]}.npy"


def read_verdict(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The kept verdict at ``path`` when it was made for exactly ``identity``, else None."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("identity") != json.loads(json.dumps(identity, default=str)):
        return None
    result = kept.get("result")
    return result if isinstance(result, dict) and isinstance(result.get("dice"), float | int) else None


def write_verdict(path: Path, identity: dict[str, Any], result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"identity": identity, "result": result}, indent=2, default=str))


def fp32_reference(
    spec: ModelSpec, model_sha256: str, device: torch.device, volume: np.ndarray, root: Path, use_cache: bool = True
) -> tuple[np.ndarray, bool]:
    """fp32 eager PyTorch's mask on ``volume``: read from this machine's cache, else computed (and kept).

    Returns the mask and whether it came from the cache.
    """
    identity = {**model_identity(spec, model_sha256, volume), **machine_identity(device)}
    path = reference_path(root, model_sha256, identity)
    if use_cache:
        try:
            mask = np.load(path, allow_pickle=False)
            if mask.shape == volume.shape[1:] and mask.dtype == np.bool_:
                return mask, True
        except (OSError, ValueError):
            pass
    from worker.engines.torch_engine import TorchEngine

    reference = TorchEngine(spec, device, "fp32")
    mask = reference_mask(reference, volume, spec)
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, mask, allow_pickle=False)
    return mask, False


def gate(
    engine: Engine,
    spec: ModelSpec,
    model_sha256: str,
    volume: np.ndarray,
    root: Path,
    min_dice: float,
    use_cache: bool = True,
) -> tuple[dict[str, Any], str]:
    """The gate's verdict on ``engine`` (EngineRefusedError below ``min_dice``) and how it was reached:
    ``cached verdict`` (a kept pass for exactly this engine, model, volume and machine), or ``ran`` (against the
    fp32 reference, itself computed or read from the cache)."""
    identity = {
        **engine_identity(engine),
        **model_identity(spec, model_sha256, volume),
        **machine_identity(engine.device),
    }
    path = verdict_path(root, model_sha256, identity)
    if use_cache:
        kept = read_verdict(path, identity)
        if kept is not None and kept["dice"] >= min_dice:
            logger.info(
                "accuracy gate: used the cached verdict %s (same engine, PyTorch, GPU and checkpoint)", path.name
            )
            return kept, "cached verdict"
    mask, cached = fp32_reference(spec, model_sha256, engine.device, volume, root, use_cache)
    result = check_mask(engine, mask, spec, volume, min_dice).as_dict()
    write_verdict(path, identity, result)
    return result, "ran against the cached fp32 reference" if cached else "ran"
