"""AOTInductor packages: the compiled network built once per machine, loaded in seconds by each worker start.

``torch.compile`` keeps its kernels in inductor's on-disk cache, but a worker start still traces the network
with dynamo and rebuilds the graph: 86 s for SwinUNETR (fp16, batch 16) on an H200 with a warm cache
(bench/warm_start.py). ``SEGQ_TORCH_COMPILE=aot`` instead exports the wrapped network once
(``torch.export``), compiles it with inductor into a package (``aoti_compile_and_package``, the same
options as the other modes: comprehensive padding off), and stores it with a JSON sidecar next to the
ONNX exports and TensorRT plans, under ``SEGQ_ENGINE_DIR/<model>/``. Later starts load the shared library
from the package; the eager network is not even built.

The package is specific to the model, precision, ROI batch, GPU architecture and PyTorch build: all of them
are in its name, so an upgrade or another GPU builds (and gates) a package of its own. The accuracy gate's
verdict is written into the sidecar once the package has passed it, and a start that finds one does not run
the gate again (a TensorRT plan keeps its verdict the same way).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import Timeout
from torch import nn

from segq.errors import EngineError, EngineRefusedError
from worker.engines.cache import LOCK_TIMEOUT, build_lock, model_dir

logger = logging.getLogger("segq.engine.aot")


@dataclass
class AotMeta:
    """The sidecar of a package: what it was built from and for, and the accuracy gate's verdict."""

    model_sha256: str
    precision: str
    batch: int
    target: str
    torch_version: str
    build_seconds: float
    accuracy: dict[str, Any] | None = field(default=None)
    # Whether a separate process loaded and ran the package (None: not tried yet); why it could not.
    loads: bool | None = field(default=None)
    load_error: str | None = field(default=None)

    @classmethod
    def read(cls, path: Path) -> AotMeta | None:
        try:
            return cls(**json.loads(sidecar(path).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Write the sidecar of ``path`` whole: a reader sees the old file or the new one."""
        tmp = sidecar(path).with_name(sidecar(path).name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, sidecar(path))


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def target(device: torch.device) -> str:
    """The hardware a package runs on: a GPU architecture (sm90 for an H100 or H200), or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def package_path(engine_root: Path, model_sha256: str, precision: str, batch: int, device: torch.device) -> Path:
    build = re.sub(r"[^A-Za-z0-9.]+", "_", torch.__version__)
    return model_dir(engine_root, model_sha256) / f"aot-{precision}-b{batch}-{target(device)}-torch{build}.pt2"


def fits(path: Path, model_sha256: str, precision: str, batch: int, device: torch.device) -> AotMeta | None:
    """The package's sidecar when the package is there and was built for exactly this, else None."""
    meta = AotMeta.read(path)
    if not path.is_file() or meta is None:
        return None
    wanted = (model_sha256, precision, batch, target(device), torch.__version__)
    return meta if (meta.model_sha256, meta.precision, meta.batch, meta.target, meta.torch_version) == wanted else None


def build(network: nn.Module, example: torch.Tensor, path: Path, options: dict[str, Any]) -> None:
    """Export ``network`` at ``example``'s shape and compile it into the package ``path`` (minutes)."""
    with torch.no_grad():
        program = torch.export.export(network, (example,), strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)


def load(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    runner: Callable[[torch.Tensor], torch.Tensor] = torch._inductor.aoti_load_package(str(path))
    return runner


# Run by `probe` in a process of its own: load the package and run it once on zeros of the example's shape.
PROBE = """
import sys, torch
path, device, dtype, *shape = sys.argv[1:]
runner = torch._inductor.aoti_load_package(path)
runner(torch.zeros([int(n) for n in shape], device=device, dtype=getattr(torch, dtype)))
"""
PROBE_TIMEOUT = 600


def probe(path: Path, example: torch.Tensor) -> str | None:
    """Load and run the package in a child process first: None when it worked, else what went wrong.

    A package that does not load can crash its process outright: PyTorch 2.11+cu130 on an H200 died with
    SIGSEGV inside its package loader for every package, a tiny UNet's included
    (bench/results/aot_load_check_h200.jsonl). In the worker that would be a crash on every start instead
    of an error that says what to do.
    """
    argv = [sys.executable, "-c", PROBE, str(path), str(example.device), str(example.dtype).removeprefix("torch."),
            *map(str, example.shape)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"loading it took over {PROBE_TIMEOUT} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"the process that loaded it died of {signal.Signals(-done.returncode).name}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return f"loading it failed: {lines[-1] if lines else f'exit status {done.returncode}'}"


def ensure(path: Path, model_sha256: str, precision: str, batch: int, device: torch.device,
           network: Callable[[], nn.Module], example: torch.Tensor,
           options: dict[str, Any]) -> tuple[Callable[[torch.Tensor], torch.Tensor], AotMeta]:
    """The package at ``path`` loaded, built first (once, under a lock other workers wait on) when missing.

    ``network`` builds the eager network; it is called only when the package has to be built. A new package
    is first loaded in a child process (``probe``); one that failed there is refused (EngineRefusedError: the
    worker exits 78 and is not restarted) instead of being loaded here.
    """
    meta = fits(path, model_sha256, precision, batch, device)
    if meta is None or meta.loads is None:
        try:
            with build_lock(path):
                meta = fits(path, model_sha256, precision, batch, device)  # another worker may have built it
                if meta is None:
                    meta = _build(path, model_sha256, precision, batch, device, network(), example, options)
                if meta.loads is None:  # once per package: its sidecar keeps the answer
                    meta.load_error = probe(path, example)
                    meta.loads = meta.load_error is None
                    meta.write(path)
        except Timeout as exc:
            raise EngineError(f"waited {LOCK_TIMEOUT} s for the lock on {path}; remove {path}.lock if no "
                              "worker is building") from exc
    if not meta.loads:
        raise EngineRefusedError(f"the AOTInductor package {path} cannot be used with PyTorch {torch.__version__} on "
                                 f"this machine: {meta.load_error}. Set SEGQ_TORCH_COMPILE=default (torch.compile) "
                                 "or off (eager) instead")
    started = time.perf_counter()
    runner = load(path)
    logger.info("loaded the AOTInductor package %s in %.1f s", path.name, time.perf_counter() - started)
    return runner, meta


def _build(path: Path, model_sha256: str, precision: str, batch: int, device: torch.device, network: nn.Module,
           example: torch.Tensor, options: dict[str, Any]) -> AotMeta:
    logger.info("building the AOTInductor package %s: minutes for SwinUNETR, once per machine (or run "
                "`segq warm-engine` before starting workers)", path.name)
    candidate = path.with_name(f"{path.stem}.candidate-{os.getpid()}.pt2")
    started = time.perf_counter()
    try:
        build(network, example, candidate, options)
        meta = AotMeta(model_sha256, precision, batch, target(device), torch.__version__,
                       round(time.perf_counter() - started, 1))
        meta.write(path)
        os.replace(candidate, path)
    except EngineError:
        raise
    except Exception as exc:  # export and inductor raise many types; the worker needs one with a way out
        raise EngineError(f"could not build the AOTInductor package {path.name}: {type(exc).__name__}: {exc}. "
                          "Set SEGQ_TORCH_COMPILE=default (torch.compile) or off (eager) instead") from exc
    finally:
        candidate.unlink(missing_ok=True)
    logger.info("built %s in %.1f s", path.name, meta.build_seconds)
    return meta
