"""Which torch.compile a worker uses, chosen from what the installed PyTorch has and what the network repeats.

Measured on one H200 (PyTorch 2.11+cu130, SwinUNETR fs48 fp16, ROI batch 16, docs/DESIGN.md): compiling the
whole network took 138 s cold and 66 s from inductor's on-disk cache, because dynamo traces the whole network
again on every start. Regional compilation, each SwinTransformerBlock and each encoder/decoder block compiled on
its own, took 70 s cold and 9.9 s from the cache, and ran a BraTS-size volume as fast (0.304 s against
0.297 s). Dynamo traces each block class once per shape and every instance of that shape reuses the graph.
So ``auto`` compiles regionally where the network has repeated blocks it knows, and the whole network otherwise.

``precompile`` and ``aot`` need APIs that not every PyTorch has (PyTorch 2.11 has no ``aot_compile`` on compiled
functions): where one is missing the choice falls back to what ``auto`` picks and says so in one line.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("segq.engine.compile")

# The blocks a network is made of, by the network's class name, compiled one by one (regional compilation).
# SwinUNETR: as measured on the H200. UNet and SegResNet (bundles bring them): their residual and convolution
# units. A network not listed is compiled whole.
REGIONS: dict[str, tuple[str, ...]] = {
    "SwinUNETR": ("SwinTransformerBlock", "UnetrBasicBlock", "UnetrUpBlock", "UnetOutBlock"),
    "UNet": ("ResidualUnit", "Convolution"),
    "SegResNet": ("ResBlock",),
}
_TORCH_COMPILE = torch.compile
MIN_REPEATED = 2  # below this a network has nothing that repeats: regional compilation would save no tracing


@dataclass(frozen=True)
class TorchFeatures:
    """What the installed PyTorch offers to the compile modes."""

    version: str
    aot_compile: bool  # torch.compile(f).aot_compile, for precompile (absent in PyTorch 2.11)
    aot_inductor: bool  # torch._inductor.aoti_compile_and_package, for aot
    module_compile: bool  # nn.Module.compile (in place), for regional compilation

    @classmethod
    def installed(cls) -> TorchFeatures:
        return _installed()


@functools.cache  # detected once a process
def _installed() -> TorchFeatures:
    import torch._inductor

    # torch.compile only wraps the function here; nothing is traced or compiled until it is called. The one
    # PyTorch installed, as imported with this module: not a stand-in a test may have put in its place since.
    with aot_compile_switch():
        compiled = _TORCH_COMPILE(_identity)
    return TorchFeatures(
        torch.__version__,
        hasattr(compiled, "aot_compile") and hasattr(torch.compiler, "load_compiled_function"),
        hasattr(torch._inductor, "aoti_compile_and_package"),
        hasattr(nn.Module, "compile"),
    )


def _identity(x: Any) -> Any:
    return x


def aot_compile_switch() -> AbstractContextManager[Any]:
    """Switch on ``torch._dynamo.config.enable_aot_compile`` where the installed PyTorch has it.

    torch.compile gives its wrapper ``aot_compile`` only when that flag is on: on by default in PyTorch 2.13, off
    in at least one earlier release, which is what "no attribute 'aot_compile'" on PyTorch 2.11 may have been.
    """
    import torch._dynamo

    config = torch._dynamo.config
    return config.patch(enable_aot_compile=True) if hasattr(config, "enable_aot_compile") else nullcontext()


@dataclass(frozen=True)
class CompileChoice:
    """The mode an engine compiles with (None: eager), and one line for the log when it is not the one asked."""

    mode: str | None
    note: str | None = None


def describe(mode: str | None) -> str:
    if mode is None:
        return "nothing (eager)"
    if mode == "regional":
        return "the repeated blocks one by one (regional)"
    return f"the whole network (torch.compile {mode})"


def choose(requested: str | None, features: TorchFeatures, blocks: Callable[[], int]) -> CompileChoice:
    """The compile mode for ``requested`` (a SEGQ_TORCH_COMPILE mode, ``auto``, or None for eager) on this PyTorch.

    ``blocks`` counts the network's repeated blocks (``repeated_blocks``); it is called only when the choice
    depends on it, so an ``aot`` package that loads never needs the eager network built.
    """
    if requested is None:
        return CompileChoice(None)
    missing = {
        "precompile": (features.aot_compile, "aot_compile on compiled functions"),
        "aot": (features.aot_inductor, "torch._inductor.aoti_compile_and_package"),
    }
    if requested in missing and not missing[requested][0]:
        fallback = choose("auto", features, blocks).mode
        return CompileChoice(
            fallback,
            f"SEGQ_TORCH_COMPILE={requested} needs {missing[requested][1]}, which "
            f"PyTorch {features.version} lacks: compiling {describe(fallback)} instead",
        )
    if requested not in ("auto", "regional"):
        return CompileChoice(requested)
    count = blocks()
    if count >= MIN_REPEATED and features.module_compile:
        return CompileChoice("regional")
    if requested == "auto":
        return CompileChoice("default")
    why = (
        f"PyTorch {features.version} has no nn.Module.compile"
        if not features.module_compile
        else f"this network has {count} block(s) that segq compiles one by one"
    )
    return CompileChoice("default", f"SEGQ_TORCH_COMPILE=regional: {why}: compiling the whole network instead")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` (or of the network it wraps) that regional compilation compiles, outermost only.

    Only networks in ``REGIONS`` have any; a block inside another listed block is part of that one's graph.
    """
    for module in model.modules():
        kinds = REGIONS.get(type(module).__name__)
        if kinds is not None:
            return _outermost(module, kinds)
    return []


def _outermost(network: nn.Module, kinds: tuple[str, ...]) -> list[nn.Module]:
    found: list[nn.Module] = []
    inside: list[str] = []
    for name, module in network.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if type(module).__name__ in kinds:
            found.append(module)
            inside.append(name)
    return found


def compile_regions(blocks: list[nn.Module], options: dict[str, Any]) -> int:
    """Compile each block in place (``nn.Module.compile``, shapes fixed); returns how many.

    Dynamo keeps one graph per block class and input shape, and gives up on a code object (running it eager,
    with only a warning) past ``recompile_limit`` graphs: the limit is raised to the most instances of one class,
    the worst case, where every instance needs its own graph.
    """
    per_class = Counter(type(block).__name__ for block in blocks)
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), max(per_class.values(), default=0)))
    for block in blocks:
        block.compile(dynamic=False, options=options)
    return len(blocks)


_noted: set[str] = set()


def note_once(note: str | None) -> None:
    """Log a fallback once a process, however many engines (one per ROI batch) it builds."""
    if note is not None and note not in _noted:
        _noted.add(note)
        logger.warning(note)
