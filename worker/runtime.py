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
from worker.engines.startup import StartClock

logger = logging.getLogger("segq.runtime")

_engines: dict[tuple[str, str, str, int], Engine] = {}
_starts: dict[tuple[str, str, str, int], StartClock] = {}
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
            clock = StartClock()
            with loading(worker if slow else None, what, settings):
                engine = _start(spec, model_sha256, settings, device, mode, clock)
            logger.info("engine ready in %.1f s (%s)", time.perf_counter() - started, clock.line())
            _engines[key] = engine
            _starts[key] = clock
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


def _start(spec: ModelSpec, model_sha256: str, settings: Settings, device: torch.device, mode: str | None,
           clock: StartClock) -> Engine:
    """Build the engine, run it once (a compiled engine compiles there) and gate it, each step on ``clock``."""
    if device.type == "cuda":
        with clock.step("cuda init"):
            torch.empty(0, device=device)
    engine = create_engine(spec, settings.backend, settings.precision, device, mode, settings, model_sha256, clock)
    if settings.backend != "torch":
        return engine
    if mode is not None or device.type == "cuda":  # the compile, cuDNN's autotuning: paid now, not by a part
        with clock.step("first call"):
            engine(torch.zeros((spec.sw_batch_size, spec.in_channels, *spec.roi)))
    if mode or settings.precision != "fp32":
        with clock.step("gate"):
            how, result = gate(engine, spec, settings, model_sha256)
        clock.notes.update(gate_verdict=how, gate_dice=result["dice"], gate_agreement=result["agreement"])
    return engine


def last_start(model_sha256: str, settings: Settings, sw_batch_size: int) -> StartClock | None:
    """The timed steps of the start of this process's engine for the model (None if it has not started)."""
    device = pick_device(settings.device)
    mode = compile_mode(settings.torch_compile, settings.precision, device) if settings.backend == "torch" else None
    return _starts.get((model_sha256, settings.backend, settings.precision, sw_batch_size if mode else 0))


def gate(engine: Engine, spec: ModelSpec, settings: Settings,
         model_sha256: str | None = None) -> tuple[str, dict[str, Any]]:
    """Refuse a reduced-precision or compiled engine whose masks disagree with fp32 eager PyTorch; returns how the
    verdict was reached, and the verdict.

    Run when a worker loads the engine, on the gate's synthetic reference volume, so a PyTorch or driver
    upgrade that breaks the numerics of a mode is refused (EngineRefusedError: the worker exits with 78 and is
    not restarted) before it writes a mask. A saved compiled network (``aot``, ``precompile``) keeps its verdict
    (its name holds the model, GPU architecture and PyTorch build), so only its first load runs the gate. Any other
    engine's passed verdict is kept per engine, model, PyTorch and GPU (worker/engines/verdicts.py): a start that
    matches one reads it, and the fp32 reference is computed once per machine.
    """
    from segq import faults
    from worker.engines.gate import reference_volume
    from worker.engines.torch_engine import TorchEngine
    from worker.engines.verdicts import gate as run_gate

    faults.point("in_gate", precision=engine.precision)
    recorded = getattr(engine, "accuracy", None)
    # A saved compiled network passed the gate on its first load for this model, GPU and PyTorch (its name says so).
    if recorded is not None and recorded["dice"] >= settings.gate_min_dice:
        logger.info("accuracy gate passed when the package was built: Dice %.5f, voxel agreement %.4f%% against "
                    "fp32 eager", recorded["dice"], 100 * recorded["agreement"])
        return "passed when the package was built", recorded
    result, how = run_gate(engine, spec, model_sha256 or spec.checksum(), reference_volume(spec),
                           settings.engine_root, settings.gate_min_dice, settings.gate_cache)
    if isinstance(engine, TorchEngine):
        engine.record_accuracy(result)
    logger.info("accuracy gate passed: Dice %.5f, voxel agreement %.4f%% against fp32 eager (%s)", result["dice"],
                100 * result["agreement"], how)
    return how, result


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
        _starts.clear()
