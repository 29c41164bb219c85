"""TensorRT plan bookkeeping that needs no TensorRT: names, sidecars, refusal, batch profiles.

A serialized plan only runs on the GPU model and TensorRT version it was built with, so each plan
has a sidecar JSON that records both, the ONNX file it came from and the plan's own sha256. A plan
whose sidecar does not match this process (or whose bytes changed) is refused before TensorRT
deserializes it, with a message that says how to get a fitting one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segq import storage
from segq.errors import EngineError
from segq.modelspec import file_sha256

INPUT_NAME = "input"
OUTPUT_NAME = "probability"
PLAN_PRECISIONS = ("fp32", "fp16")


class PlanRefusedError(EngineError):
    """A plan exists but must not be loaded here (other GPU, other TensorRT, changed bytes)."""


@dataclass(frozen=True)
class Profile:
    """TensorRT's optimization profile for the batch axis: the plan accepts min..max ROIs a call."""

    min: int = 1
    opt: int = 8
    max: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise EngineError(f"batch profile must satisfy 1 <= min <= opt <= max, got "
                              f"min={self.min} opt={self.opt} max={self.max}")

    def shapes(self, sample: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes for ``set_shape``; ``sample`` is one ROI's (C, *roi)."""
        return (self.min, *sample), (self.opt, *sample), (self.max, *sample)

    def tag(self) -> str:
        return f"b{self.min}-{self.opt}-{self.max}"


def chunk_batch(n: int, profile: Profile) -> list[tuple[int, int, int]]:
    """Split ``n`` ROIs into calls the plan accepts: ``(lo, hi, size)`` with ``size`` the batch actually run.

    Chunks hold at most ``profile.max`` ROIs; a last chunk smaller than ``profile.min`` is run
    padded up to ``profile.min`` (``size > hi - lo``), since the plan refuses shapes outside its profile.
    """
    if n < 0:
        raise ValueError(f"batch size must be >= 0, got {n}")
    chunks = []
    for lo in range(0, n, profile.max):
        hi = min(lo + profile.max, n)
        chunks.append((lo, hi, max(hi - lo, profile.min)))
    return chunks


@dataclass(frozen=True)
class PlanTarget:
    """What a plan is bound to: the GPU model, its compute capability and the TensorRT version."""

    gpu_name: str
    compute_capability: str
    trt_version: str

    def tag(self) -> str:
        return f"{slug(self.gpu_name)}_sm{self.compute_capability.replace('.', '')}_trt{self.trt_version}"


def slug(text: str) -> str:
    """A file-name-safe form of a GPU name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "gpu"


def plan_name(model_sha256: str, target: PlanTarget, precision: str, profile: Profile) -> str:
    """Deterministic plan file name: a worker finds the plan for its model and GPU without listing the cache
    (and without exporting ONNX when the plan is there)."""
    if precision not in PLAN_PRECISIONS:
        raise EngineError(f"TensorRT plans are built in {' or '.join(PLAN_PRECISIONS)}, not {precision!r}")
    return f"model-{model_sha256[:12]}_{target.tag()}_{precision}_{profile.tag()}.plan"


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


@dataclass
class PlanMeta:
    """The sidecar of a plan file."""

    onnx_sha256: str
    plan_sha256: str
    gpu_name: str
    compute_capability: str
    trt_version: str
    precision: str
    profile: dict[str, int]
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    model_sha256: str | None = None
    build_seconds: float | None = None
    accuracy: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> PlanTarget:
        return PlanTarget(self.gpu_name, self.compute_capability, self.trt_version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> PlanMeta:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError as exc:
            raise PlanRefusedError(f"plan sidecar {path} is missing: a plan without one cannot be checked; "
                                   "rebuild it with `segq build-engine`") from exc
        except (ValueError, TypeError) as exc:
            raise PlanRefusedError(f"plan sidecar {path} is unreadable ({exc}); rebuild with `segq build-engine`") \
                from exc


def plan_problems(meta: PlanMeta, target: PlanTarget, plan_sha256: str | None = None,
                  onnx_sha256: str | None = None) -> list[str]:
    """Why a plan must not run here; empty when it may."""
    problems = []
    if meta.gpu_name != target.gpu_name:
        problems.append(f"built for GPU {meta.gpu_name!r}, this is {target.gpu_name!r}")
    if meta.compute_capability != target.compute_capability:
        problems.append(f"built for compute capability {meta.compute_capability}, this GPU has "
                        f"{target.compute_capability}")
    if meta.trt_version != target.trt_version:
        problems.append(f"built with TensorRT {meta.trt_version}, this process has {target.trt_version}")
    if plan_sha256 is not None and plan_sha256 != meta.plan_sha256:
        problems.append(f"its bytes changed since the build (sha256 {plan_sha256[:12]}, recorded "
                        f"{meta.plan_sha256[:12]})")
    if onnx_sha256 is not None and onnx_sha256 != meta.onnx_sha256:
        problems.append(f"it was built from another ONNX file (sha256 {meta.onnx_sha256[:12]}, expected "
                        f"{onnx_sha256[:12]})")
    return problems


def rebuild_hint(onnx: Path | str, meta_or_precision: PlanMeta | str, profile: Profile | None = None) -> str:
    if isinstance(meta_or_precision, PlanMeta):
        precision = meta_or_precision.precision
        profile = Profile(**meta_or_precision.profile)
    else:
        precision = meta_or_precision
    profile = profile or Profile()
    flag = " --fp16" if precision == "fp16" else ""
    return (f"segq build-engine --onnx {onnx}{flag} --min-batch {profile.min} --opt-batch {profile.opt} "
            f"--max-batch {profile.max}")


def check_plan(plan: Path, target: PlanTarget, onnx_sha256: str | None = None) -> PlanMeta:
    """The plan's sidecar if the plan may run on ``target``; else PlanRefusedError saying why and what to do."""
    if not plan.is_file():
        raise PlanRefusedError(f"TensorRT plan {plan} does not exist; build it with `segq build-engine`")
    meta = PlanMeta.read(sidecar_path(plan))
    problems = plan_problems(meta, target, file_sha256(plan), onnx_sha256)
    if problems:
        raise PlanRefusedError(f"refusing TensorRT plan {plan.name}: {'; '.join(problems)}. Rebuild it on this "
                               f"machine: {rebuild_hint('<model.onnx>', meta)} (a worker with SEGQ_ENGINE_BUILD=true "
                               "rebuilds it itself)")
    return meta


def write_plan(plan: Path, data: bytes, meta: PlanMeta) -> PlanMeta:
    """Write the plan and its sidecar atomically; the sidecar records the plan's sha256."""
    import hashlib

    meta.plan_sha256 = hashlib.sha256(data).hexdigest()
    with storage.atomic_path(plan) as tmp:
        tmp.write_bytes(data)
    with storage.atomic_path(sidecar_path(plan)) as tmp:
        tmp.write_text(meta.to_json())
    return meta


def io_names(tensors: Iterable[tuple[str, bool]]) -> tuple[str, str]:
    """(input, output) names from an engine's (name, is_input) list; the graph must have one of each."""
    items = list(tensors)
    inputs = [name for name, is_input in items if is_input]
    outputs = [name for name, is_input in items if not is_input]
    if len(inputs) != 1 or len(outputs) != 1:
        raise EngineError(f"the plan must have one input and one output tensor, it has inputs {inputs} and "
                          f"outputs {outputs}; export the ONNX with `segq export-onnx`")
    return inputs[0], outputs[0]


def plans_for(directory: Path, target: PlanTarget) -> list[Path]:
    """Plans under ``directory`` (recursively) whose name says they were built for ``target``."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*.plan") if f"_{target.tag()}_" in p.name)
