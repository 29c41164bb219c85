"""Per-process state of a worker: its engine, loaded once and kept for every task it runs."""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from segq.errors import InputError
from segq.modelspec import ModelSpec, spec_from_dict
from segq.settings import Settings
from worker.engines import Engine, create_engine, pick_device

logger = logging.getLogger("segq.runtime")

_engines: dict[tuple[str, str, str], Engine] = {}
_lock = threading.Lock()


def engine_for(model: dict[str, Any], model_sha256: str, settings: Settings) -> tuple[ModelSpec, Engine]:
    """This process's engine for the job's model, built on first use.

    The checkpoint's checksum must still be the one recorded at submission: a model file changed
    under a queued dataset would otherwise give a dataset made by two different models.
    """
    spec = spec_from_dict(model)
    key = (model_sha256, settings.backend, settings.precision)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            actual = spec.checksum()
            if actual != model_sha256:
                raise InputError(f"the model at {spec.path} changed since the dataset was submitted "
                                 f"(checksum {actual[:12]}, recorded {model_sha256[:12]}); submit again")
            device = pick_device(settings.device)
            logger.info("loading %s engine (%s, %s) for model %s", settings.backend, settings.precision, device,
                        model_sha256[:12])
            engine = create_engine(spec, settings.backend, settings.precision, device, settings.torch_compile)
            if settings.test_oom_above is not None:
                engine = OomAbove(engine, settings.test_oom_above)
            _engines[key] = engine
    return spec, engine


class OomAbove:
    """TEST ONLY (SEGQ_TEST_OOM_ABOVE=N): an engine that runs out of memory for batches above N ROIs.

    It lets the tests drive the out-of-memory path (halve the ROI batch and retry) on a CPU worker;
    a real GPU raises the same torch.OutOfMemoryError from inside the network.
    """

    def __init__(self, engine: Engine, limit: int) -> None:
        self.inner = engine
        self.limit = limit
        self.backend, self.precision, self.device = engine.backend, engine.precision, engine.device
        logger.warning("SEGQ_TEST_OOM_ABOVE=%d: simulating CUDA out of memory above %d ROIs per batch (test only)",
                       limit, limit)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated CUDA out of memory: batch of {batch.shape[0]} ROIs "
                                         f"above SEGQ_TEST_OOM_ABOVE={self.limit}")
        return self.inner(batch)


def reset_gpu_peak(engine: Engine) -> None:
    """Start measuring the engine's peak GPU memory afresh (before a slab); nothing on a CPU engine."""
    device = getattr(engine, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_bytes(engine: Engine) -> int | None:
    """The most GPU memory torch held on the engine's device since the last reset; None on a CPU engine.

    Recorded per subtask, it shows how close each worker runs to out-of-memory (``segq metrics``).
    """
    device = getattr(engine, "device", None)
    if device is None or device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def clear() -> None:
    with _lock:
        _engines.clear()
