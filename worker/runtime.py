"""Per-process state of a worker: its engine, loaded once and kept for every task it runs."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

import torch

from segq import clock, records
from segq.errors import EngineError, InputError
from segq.modelspec import ModelSpec, spec_from_dict
from segq.scheduler import loading
from segq.settings import Settings, get_settings
from worker.engines import Engine, compile_mode, create_engine, pick_device

logger = logging.getLogger("segq.runtime")

_engines: dict[tuple[str, str, str, int], Engine] = {}
_lock = threading.Lock()


def engine_for(model: dict[str, Any], model_sha256: str, settings: Settings,
               batch_size: int | None = None, worker: str | None = None) -> tuple[ModelSpec, Engine]:
    """This process's engine for the job's model, built on first use.

    The ROI batch has one owner: the step, which runs the dataset's ``sw_batch_size`` or, after running
    out of memory, half of it (``batch_size``). An engine that fixes its batch (``torch.compile``) is built
    and kept per batch size, so a later dataset's batch and the halved retry get an engine of their
    own instead of being padded to the first one's. The checkpoint's checksum must still be the one
    recorded at submission: a model file changed under a queued dataset would otherwise give a dataset
    made by two different models. While it builds, ``worker`` is listed as loading in Redis (``segq watch``).
    """
    spec = spec_from_dict(model)
    if batch_size is not None and batch_size != spec.sw_batch_size:
        spec = spec.with_overrides(sw_batch_size=batch_size)
    device = pick_device(settings.device)
    mode = compile_mode(settings.torch_compile, settings.precision, device) if settings.backend == "torch" else None
    key = (model_sha256, settings.backend, settings.precision, spec.sw_batch_size if mode else 0)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            actual = spec.checksum()
            if actual != model_sha256:
                raise InputError(f"the model at {spec.path} changed since the dataset was submitted "
                                 f"(checksum {actual[:12]}, recorded {model_sha256[:12]}); submit again")
            what = f"{settings.backend} {settings.precision}" + (f", torch.compile {mode}" if mode else "")
            logger.info("loading the %s engine on %s for model %s", what, device, model_sha256[:12])
            started = time.perf_counter()
            slow = mode is not None or settings.backend != "torch"  # a compile, an ONNX export or a TensorRT build
            with loading(worker if slow else None, what, settings):
                engine = create_engine(spec, settings.backend, settings.precision, device, mode, settings,
                                       model_sha256)
                if settings.backend == "torch" and (mode or settings.precision != "fp32"):
                    gate(engine, spec, settings)
            logger.info("engine ready in %.1f s", time.perf_counter() - started)
            _engines[key] = engine
    return spec, engine


def warm_up(settings: Settings, worker: str) -> int:
    """Build the engines of the datasets running now, before this worker takes any message; returns how many.

    A GPU worker that joins a running dataset must not hold parts while it compiles (a first torch.compile
    takes minutes): it builds first, then starts consuming, and only then counts in the admission window and
    the split rule (its heartbeat starts with the consumer). A model that cannot load here is left to the part
    that needs it, whose step fails it by the policy (worker/steps.py); a broken or refused engine ends the
    process as a step would (EngineError).
    """
    built = 0
    for model, sha in records.active_models():
        try:
            engine_for(model, sha, settings, None, worker)
            built += 1
        except EngineError:
            raise
        except Exception as exc:  # this dataset's own parts fail it with the reason; the worker joins anyway
            logger.warning("could not build the engine of model %s before joining (%s); its parts will",
                           sha[:12], exc)
    return built


def gate(engine: Engine, spec: ModelSpec, settings: Settings) -> None:
    """Refuse a reduced-precision or compiled engine whose masks disagree with fp32 eager PyTorch.

    Run when a worker loads the engine, on the gate's synthetic reference volume, so a PyTorch or driver
    upgrade that breaks the numerics of a mode is refused (EngineRefusedError: the worker exits with 78 and is
    not restarted) before it writes a mask. For a compiled engine this is also where the compile happens. A saved
    compiled network (``aot``, ``precompile``) keeps its verdict (its name holds the model, GPU architecture and
    PyTorch build), so only its first load runs the gate.
    """
    from segq import faults
    from worker.engines.gate import check_accuracy, reference_volume
    from worker.engines.torch_engine import TorchEngine

    faults.point("in_gate", precision=engine.precision)
    recorded = getattr(engine, "accuracy", None)
    # A saved compiled network passed the gate on its first load for this model, GPU and PyTorch (its name says so).
    if recorded is not None and recorded["dice"] >= settings.gate_min_dice:
        logger.info("accuracy gate passed when the package was built: Dice %.5f, voxel agreement %.4f%% against "
                    "fp32 eager", recorded["dice"], 100 * recorded["agreement"])
        return
    reference = TorchEngine(spec, engine.device, "fp32")
    result = check_accuracy(engine, reference, spec, reference_volume(spec), settings.gate_min_dice)
    del reference
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    if isinstance(engine, TorchEngine):
        engine.record_accuracy(result.as_dict())
    logger.info("accuracy gate passed: Dice %.5f, voxel agreement %.4f%% against fp32 eager", result.dice,
                100 * result.agreement)


class DeviceLease:
    """The engine's device, held by one step at a time in this process (``with lease:``).

    A GPU worker runs ``SEGQ_GPU_PREFETCH`` tasks in threads: while one holds the device, the others read
    their input or write their partial. The lease records when it was held (the timeline's busy
    interval) and the peak device memory while it was (None on a CPU).
    """

    _locks: dict[str, threading.Lock] = {}

    def __init__(self, engine: Engine) -> None:
        self.device: torch.device = getattr(engine, "device", torch.device("cpu"))
        with _lock:
            self._device_lock = self._locks.setdefault(str(self.device), threading.Lock())
        self.interval: tuple[datetime, datetime] | None = None
        self.peak_bytes: int | None = None
        self._watch: clock.Stopwatch | None = None

    @property
    def label(self) -> str:
        """The device as the machine names it: the GPU this worker is pinned to, else ``cpu``."""
        if self.device.type != "cuda":
            return "cpu"
        visible = get_settings().cuda_visible_devices
        return f"gpu{visible}" if visible else str(self.device)

    def __enter__(self) -> DeviceLease:
        self._device_lock.acquire()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._watch = clock.Stopwatch()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            assert self._watch is not None
            self.interval = self._watch.span()  # its length from the monotonic clock
            if self.device.type == "cuda":
                self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        finally:
            self._device_lock.release()


def clear() -> None:
    with _lock:
        _engines.clear()
