"""Compiled networks saved once per machine and loaded by each worker start: AOTInductor packages (``aot``)
and dynamo's precompiled functions (``precompile``).

``torch.compile`` keeps its kernels in inductor's on-disk cache, but a worker start still traces the network
with dynamo and rebuilds the graph: 86 s for SwinUNETR (fp16, batch 16) on an H200 with a warm cache
(bench/warm_start.py). ``SEGQ_TORCH_COMPILE=aot`` instead exports the wrapped network once
(``torch.export``), compiles it with inductor into a package (``aoti_compile_and_package``, the same
options as the other modes: comprehensive padding off), and stores it with a JSON sidecar next to the
ONNX exports and TensorRT plans, under ``SEGQ_ENGINE_DIR/<model>/``. Later starts load the shared library
from the package; the eager network is not even built.

``SEGQ_TORCH_COMPILE=precompile`` keeps torch.compile's own path (Python wrapper, Triton kernels) but saves
dynamo's result too (``torch.compile(...).forward.aot_compile`` and ``save_compiled_function``, experimental
in PyTorch): a start loads it with ``torch.compiler.load_compiled_function`` instead of tracing. The weights
stay in the network, which a start still builds.

The package is specific to the model, precision, ROI batch, GPU architecture and PyTorch build: all of them
are in its name, so an upgrade or another GPU builds (and gates) a package of its own. The accuracy gate's
verdict is written into the sidecar once the package has passed it, and a start that finds one does not run
the gate again (a TensorRT plan keeps its verdict the same way).
"""

from __future__ import annotations

import functools
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

from segq import storage
from segq.errors import EngineError, EngineRefusedError
from worker.engines.compiling import aot_compile_switch
from worker.engines.files import LOCK_TIMEOUT, build_lock, model_dir
from worker.engines.plans import sidecar_path

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
            return cls(**json.loads(sidecar_path(path).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Write the sidecar of ``path`` whole: a reader sees the old file or the new one."""
        with storage.atomic_path(sidecar_path(path)) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2))


def target(device: torch.device) -> str:
    """The hardware a package runs on: a GPU architecture (sm90 for an H100 or H200), or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


# Each kind's file suffix: an AOTInductor package is a .pt2 archive; a precompiled function, pickled bytes.
KINDS = {"aot": ".pt2", "precompile": ".bin"}
Runner = Callable[[torch.Tensor], torch.Tensor]


def package_path(engine_root: Path, model_sha256: str, precision: str, batch: int, device: torch.device,
                 kind: str = "aot") -> Path:
    build = re.sub(r"[^A-Za-z0-9.]+", "_", torch.__version__)
    name = f"{kind}-{precision}-b{batch}-{target(device)}-torch{build}{KINDS[kind]}"
    return model_dir(engine_root, model_sha256) / name


def kind_of(path: Path) -> str:
    return path.name.split("-", 1)[0]


def fits(path: Path, model_sha256: str, precision: str, batch: int, device: torch.device) -> AotMeta | None:
    """The package's sidecar when the package is there and was built for exactly this, else None."""
    meta = AotMeta.read(path)
    if not path.is_file() or meta is None:
        return None
    wanted = (model_sha256, precision, batch, target(device), torch.__version__)
    return meta if (meta.model_sha256, meta.precision, meta.batch, meta.target, meta.torch_version) == wanted else None


def build(network: nn.Module, example: torch.Tensor, path: Path, options: dict[str, Any]) -> None:
    """Compile ``network`` for ``example``'s shape into ``path`` (minutes), as the path's kind says."""
    if kind_of(path) == "precompile":
        skip_input_size_checks(network)
        # the mode the engine calls it in (dynamo's guards check it), with aot_compile switched on where it is a flag
        with aot_compile_switch(), torch.inference_mode():
            compiled = torch.compile(network, fullgraph=True, dynamic=False, options=options)
            function = compiled.forward.aot_compile(((example,), {}))  # type: ignore[attr-defined]
        function.save_compiled_function(str(path))
        return
    with torch.no_grad():
        program = torch.export.export(network, (example,), strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)


def skip_input_size_checks(network: nn.Module) -> None:
    """Turn off MONAI's own input-size check (SwinUNETR's ``_check_input_size``) in ``network``.

    It runs numpy on the input's shape inside ``forward``, which dynamo cannot keep in one graph, and dynamo's
    ahead-of-time compile takes only one graph. The rule it checks (a ROI divisible by 32) is checked when the
    model file is read (ModelSpec.validate), and the compiled engine only ever sees that ROI.
    """
    for module in network.modules():
        if hasattr(module, "_check_input_size"):
            setattr(module, "_check_input_size", lambda spatial_shape: None)  # noqa: B010 (mypy: a Module attribute)


def load(path: Path, network: Callable[[], nn.Module]) -> Runner:
    """The runner in ``path``; a precompiled function is bound to ``network()`` (it holds no weights)."""
    if kind_of(path) == "precompile":
        with open(path, "rb") as handle, aot_compile_switch():
            function = torch.compiler.load_compiled_function(handle)
        # Dynamo's guards would also compare the input's dispatch keys (an inference tensor or not), which
        # varies with where a batch was made; the engine alone calls it, always at the one shape, dtype and device.
        function.disable_guard_check()  # type: ignore[attr-defined]
        return functools.partial(function, network())
    runner: Runner = torch._inductor.aoti_load_package(str(path))
    return runner


# `probe` loads the file in a process of its own, as a worker would.
PROBE_COMMAND = [sys.executable, "-m", "worker.engines.aot_probe"]
PROBE_TIMEOUT = 600


def probe(path: Path, spec: dict[str, Any], device: torch.device, precision: str) -> str | None:
    """Load and run the package in a child process first: None when it worked, else what went wrong.

    A package that does not load can crash its process outright: PyTorch 2.11+cu130 on an H200 died with
    SIGSEGV inside its package loader for every package, a tiny UNet's included
    (bench/results/aot_load_check_h200.jsonl). In the worker that would be a crash on every start instead
    of an error that says what to do.
    """
    argv = [*PROBE_COMMAND, str(path), json.dumps(spec), str(device), precision]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"loading it took over {PROBE_TIMEOUT} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"the process that loaded it died of {signal.Signals(-done.returncode).name}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(" ") and "Error" in line.split(":", 1)[0]]
    last = errors[-1] if errors else lines[-1] if lines else f"exit status {done.returncode}"
    return f"loading it failed: {last[:500]}"


def ensure(path: Path, spec: dict[str, Any], model_sha256: str, precision: str, batch: int, device: torch.device,
           network: Callable[[], nn.Module], example: torch.Tensor, options: dict[str, Any]) -> tuple[Runner, AotMeta]:
    """The compiled network at ``path`` loaded, built first (once, under a lock other workers wait on) if missing.

    ``network`` builds the eager network (for an AOTInductor package only when it has to be built); ``spec``, a
    ModelSpec's dict, lets the probe build it in its own process. A new file is first loaded in a child process
    (``probe``); one that failed there is refused (EngineRefusedError: the worker exits 78 and is not restarted)
    instead of being loaded here.
    """
    meta = fits(path, model_sha256, precision, batch, device)
    if meta is None or meta.loads is None:
        try:
            with build_lock(path):
                meta = fits(path, model_sha256, precision, batch, device)  # another worker may have built it
                if meta is None:
                    meta = _build(path, model_sha256, precision, batch, device, network(), example, options)
                if meta.loads is None:  # once per package: its sidecar keeps the answer
                    meta.load_error = probe(path, spec, device, precision)
                    meta.loads = meta.load_error is None
                    meta.write(path)
        except Timeout as exc:
            raise EngineError(f"waited {LOCK_TIMEOUT} s for the lock on {path}; remove {path}.lock if no "
                              "worker is building") from exc
    if not meta.loads:
        raise EngineRefusedError(f"the compiled network {path} cannot be used with PyTorch {torch.__version__} on "
                                 f"this machine: {meta.load_error}. Set SEGQ_TORCH_COMPILE=default (torch.compile) "
                                 "or off (eager) instead")
    started = time.perf_counter()
    runner = load(path, network)
    logger.info("loaded %s in %.1f s", path.name, time.perf_counter() - started)
    return runner, meta


def _build(path: Path, model_sha256: str, precision: str, batch: int, device: torch.device, network: nn.Module,
           example: torch.Tensor, options: dict[str, Any]) -> AotMeta:
    logger.info("building %s: minutes for SwinUNETR, once per machine (or run `segq warm-engine` before "
                "starting workers)", path.name)
    candidate = path.with_name(f"{path.stem}.candidate-{os.getpid()}{path.suffix}")
    started = time.perf_counter()
    try:
        build(network, example, candidate, options)
        meta = AotMeta(model_sha256, precision, batch, target(device), torch.__version__,
                       round(time.perf_counter() - started, 1))
        meta.write(path)
        os.replace(candidate, path)
    except Exception as exc:  # export and inductor raise many types; the worker needs one with a way out
        raise EngineError(f"could not build {path.name}: {type(exc).__name__}: {exc}. "
                          "Set SEGQ_TORCH_COMPILE=default (torch.compile) or off (eager) instead") from exc
    finally:
        candidate.unlink(missing_ok=True)
    logger.info("built %s in %.1f s", path.name, meta.build_seconds)
    return meta
