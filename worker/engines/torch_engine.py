"""PyTorch engine: the wrapped MONAI network in fp32, fp16 or bf16, optionally torch.compile'd or AOT-compiled.

On a GPU two switches make the same arithmetic faster without touching the weights: MONAI's fused
window attention (``scaled_dot_product_attention`` instead of materialising every 343x343 attention
matrix of the Swin stages) and cuDNN's autotuner for the 3D convolutions (the ROI shape is fixed, so
the search is paid once per batch size). Together they took fp16 SwinUNETR from 0.62 to 0.49 s per
BraTS-sized volume on an H100; channels-last-3d layout made it slower (0.79 s) and stays off by default.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

import worker.engines.aot as aot
from segq.errors import EngineError
from segq.modelspec import ModelSpec
from segq.settings import TorchCompile
from worker.engines.compiling import (
    TorchFeatures,
    choose,
    compile_regions,
    describe,
    note_once,
    repeated_blocks,
)
from worker.engines.model import TargetClassProbability, load_model
from worker.engines.plans import Profile, chunk_batch
from worker.engines.startup import StartClock, timed

logger = logging.getLogger("segq.engine.torch")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The torch.compile modes by name: SEGQ_TORCH_COMPILE's values less its switches (auto, off) and regional, which
# compiles blocks with the default mode's options.
COMPILE_MODES = tuple(mode for mode in get_args(TorchCompile) if mode not in ("auto", "off", "regional"))


def compile_options(mode: str | None) -> dict[str, str | int | bool | Callable[..., Any]]:
    """Inductor options for a ``torch.compile`` mode, with comprehensive padding off in every one.

    Inductor pads the strides of intermediate buffers for alignment ("comprehensive padding"). Around
    MONAI's fused window attention that padding is read as data: on an H200 (PyTorch 2.11) the first Swin
    stage compiled with it differed from eager by 41% of its magnitude, and by 0.06% without it
    (bench/compile_check.py, bench/results/compile_check_h200.jsonl). No other inductor switch fixed both.
    """
    mode = mode or "default"
    if mode not in COMPILE_MODES:
        raise EngineError(f"torch.compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    options: dict[str, str | int | bool | Callable[..., Any]] = {"comprehensive_padding": False}
    if mode == "reduce-overhead":
        options["triton.cudagraphs"] = True
    elif mode == "max-autotune-no-cudagraphs":
        options["max_autotune"] = True
    return options


def use_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch MONAI's window attention to ``scaled_dot_product_attention``; returns how many modules changed.

    MONAI documents the fused path as equivalent to the default one at inference (autograd off).
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "use_flash_attention") and hasattr(module, "relative_position_bias_table"):
            setattr(module, "use_flash_attention", enabled)  # noqa: B010 (a Module attribute mypy sees as Tensor)
            changed += 1
    return changed


def prepared_network(spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                     fused_attention: bool | None = None, channels_last: bool = False,
                     model: TargetClassProbability | None = None,
                     clock: StartClock | None = None) -> TargetClassProbability:
    """The wrapped network (``model``, else the spec's checkpoint) on ``device`` in ``dtype``; MONAI's fused
    window attention on a GPU unless ``fused_attention`` says otherwise."""
    wrapped = model if model is not None else load_model(spec, clock)
    with timed(clock, "to device"):
        wrapped.network.to(device=device, dtype=dtype)
        if channels_last:
            wrapped.network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    if fused_attention if fused_attention is not None else device.type == "cuda":
        use_fused_attention(wrapped)
    return wrapped


def use_inductor_cache(directory: Path) -> None:
    """Point inductor's on-disk cache (kernels, FX graphs, AOTAutograd results) at ``directory`` (the settings'
    ``inductor_root``), so it outlives the process: inductor reads the variable each time it looks."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)


class TorchEngine:
    backend = "torch"

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str = "fp32",
                 compile_mode: str | None = None, fused_attention: bool | None = None,
                 cudnn_benchmark: bool | None = None, channels_last: bool = False,
                 model: TargetClassProbability | None = None, engine_root: Path | None = None,
                 model_sha256: str | None = None, inductor_dir: Path | None = None,
                 clock: StartClock | None = None, features: TorchFeatures | None = None) -> None:
        """``compile_mode``: None runs eager; ``auto`` or a SEGQ_TORCH_COMPILE mode name compiles, as
        ``compiling.choose`` decides for the installed PyTorch (``features``) and this network (``aot`` and
        ``precompile``: a file under ``engine_root``). Inductor's cache goes to ``inductor_dir``, by default
        ``engine_root/inductor``. ``clock`` times the steps of the start."""
        if precision not in DTYPES:
            raise EngineError(f"precision {precision!r} is not one of {', '.join(DTYPES)}")
        if precision == "fp16" and device.type == "cpu":
            raise EngineError("fp16 needs a CUDA device; on a CPU worker set SEGQ_PRECISION=fp32 or bf16")
        if compile_mode in aot.KINDS and engine_root is None:
            raise EngineError(f"torch.compile mode {compile_mode!r} keeps its file in the engine directory: pass "
                              "engine_root")
        on_gpu = device.type == "cuda"
        self.precision = precision
        self.device = device
        self.dtype = DTYPES[precision]
        self.channels_last = channels_last and on_gpu
        self.fused_attention = fused_attention if fused_attention is not None else on_gpu
        if on_gpu and (cudnn_benchmark if cudnn_benchmark is not None else True):
            torch.backends.cudnn.benchmark = True

        @functools.cache  # built at most once, whether a package's build, its load or eager mode asks first
        def network() -> TargetClassProbability:
            return prepared_network(spec, device, self.dtype, fused_attention, self.channels_last, model, clock)

        features = features or (TorchFeatures.installed() if compile_mode is not None else None)

        def blocks() -> int:
            return len(repeated_blocks(network()))

        if compile_mode is not None:
            assert features is not None
            choice = choose(compile_mode, features, blocks)
            note_once(choice.note)
            compile_mode = choice.mode
        # A compiled graph is specialised to one batch size: batches are padded or split to
        # spec.sw_batch_size, so a volume's last, short batch does not trigger a second compile.
        self.compile_mode = compile_mode
        compiled = compile_mode is not None
        self.static = Profile(spec.sw_batch_size, spec.sw_batch_size, spec.sw_batch_size) if compiled else None
        self.reuses_output = compile_mode == "reduce-overhead"
        # The saved compiled network (aot, precompile), and the accuracy gate's verdict recorded with it
        # (runtime.gate skips a recorded pass).
        self.package: Path | None = None
        self.accuracy: dict[str, Any] | None = None
        inductor_dir = inductor_dir or (engine_root / "inductor" if engine_root is not None else None)
        if compiled and inductor_dir is not None:  # inductor's on-disk cache: kernels compiled once per machine
            use_inductor_cache(inductor_dir)
        if compile_mode in aot.KINDS:
            assert engine_root is not None
            sha = model_sha256 or spec.checksum()
            self.package = aot.package_path(engine_root, sha, precision, spec.sw_batch_size, device, compile_mode)
            example = torch.zeros((spec.sw_batch_size, spec.in_channels, *spec.roi), device=device, dtype=self.dtype)
            try:
                with timed(clock, "compile"):
                    runner, meta = aot.ensure(self.package, spec.to_dict(), sha, precision, spec.sw_batch_size,
                                              device, network, example, compile_options(compile_mode))
                self.model: Callable[[torch.Tensor], torch.Tensor] = runner
                self.accuracy = meta.accuracy
                return
            except EngineError as exc:
                if compile_mode != "precompile":  # aot has its own refusal with the way out (exit 78)
                    raise
                assert features is not None
                compile_mode = self.compile_mode = choose("auto", features, blocks).mode
                self.package = None
                note_once(f"SEGQ_TORCH_COMPILE=precompile did not work with PyTorch {features.version}: "
                          f"{str(exc)[:300]}; compiling {describe(compile_mode)} instead")
        self.model = network()
        if compile_mode == "regional":
            with timed(clock, "compile"):
                count = compile_regions(repeated_blocks(self.model), compile_options("default"))
            logger.info("compiling %d repeated blocks of the network one by one (regional torch.compile) on first "
                        "use: about a minute for SwinUNETR the first time on this machine, seconds from inductor's "
                        "cache after", count)
        elif compiled:
            logger.info("compiling the whole network with torch.compile (%s) on first use: minutes for SwinUNETR the "
                        "first time on this machine, a minute and more from inductor's cache after (SEGQ_TORCH_COMPILE"
                        "=regional starts in seconds from the cache)", compile_mode)
            with timed(clock, "compile"):
                self.model = torch.compile(self.model, dynamic=False, options=compile_options(compile_mode))

    def record_accuracy(self, result: dict[str, Any]) -> None:
        """Keep a passed gate's verdict with the AOT package, so later starts load it without the gate."""
        if self.package is None:
            return
        meta = aot.AotMeta.read(self.package)
        if meta is not None:
            meta.accuracy = result
            meta.write(self.package)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = self.model(x)
        # CUDA-graph modes of torch.compile reuse their output buffer on the next call: an fp32 output
        # is cloned there (.float() already copies an fp16 or bf16 one).
        return out.clone() if self.reuses_output and out.dtype == torch.float32 else out.float()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device=self.device, dtype=self.dtype)
        if self.static is None:
            return self._forward(x)
        parts = []
        for lo, hi, size in chunk_batch(x.shape[0], self.static):
            chunk = x[lo:hi]
            if size > hi - lo:
                chunk = torch.cat([chunk, chunk.new_zeros((size - (hi - lo), *chunk.shape[1:]))])
            parts.append(self._forward(chunk)[: hi - lo])
        return parts[0] if len(parts) == 1 else torch.cat(parts)
