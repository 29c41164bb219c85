"""TEST ONLY: faults injected into real worker processes, so the reliability tests can kill, break or stall
them at an exact point (docs/RELIABILITY.md).

Nothing happens unless ``SEGQ_FAULTS`` or ``SEGQ_FAULTS_DIR`` is set. A fault is written
``<action>_<point>[:key=value...]``, several separated by commas, for example::

    SEGQ_FAULTS="kill_in_infer_slab:slab=1:times=1,pause_before_merge_rename:seconds=20"

actions
    ``kill`` (SIGKILL this process), ``raise`` (a RuntimeError), ``cuda_error`` (on a GPU a real
    device-side assert, which leaves the CUDA context unusable; without one the RuntimeError such a
    context raises), ``pause`` (sleep ``seconds``, default 30), ``oom`` (torch.OutOfMemoryError, as a
    GPU raises it from inside the network), ``refuse`` (the accuracy gate's EngineRefusedError, as a
    PyTorch whose numerics broke would get), ``skew`` (shift this process's ``time.time()`` by ``seconds``, as on a
    machine whose clock is off: ``skew_at_start:seconds=-600``).
points
    ``in_gate`` (an engine is about to be checked against fp32 at load; context ``precision``),
    ``in_prepare`` (a volume is about to be loaded; context ``input``, its file name), ``in_stream_rows``
    (a streamed input's leading ``rows`` are written and marked ready; context ``rows``, ``job``), ``in_read_rows`` (a
    part is about to read its rows ``[lo, hi)``, ready; context ``slab``, ``lo``, ``hi``, ``job``), ``in_infer_slab``
    (a slab is about to run; context ``slab``), ``in_add_partial`` (a part's partial is half added into the
    workspace's running sum, its journal saying so; context ``slab``), ``before_merge_rename`` (the mask is
    written under its temp name, not yet renamed; context ``output``), ``before_merge_finish`` (every output
    of the merge is in place, the job row not yet done; context ``output``), ``in_submit`` (a producer looked
    for the dataset and holds the submission lock), ``in_input_hash`` (a producer hashed an input and has not
    recorded it yet; context ``input``, its file name: a pause there is a slow hash), ``at_start`` (a ``segq``
    command starts, before it imports anything that reads the clock).
keys
    ``times=N`` fires at most N times across every process; ``above=N`` only where the context's ``batch`` is
    larger than N (``oom_in_engine_batch:above=1``: every batch of two or more ROIs runs out of memory); any
    other key must equal the point's context (``slab=1``).

Hits are recorded as files in ``SEGQ_FAULTS_DIR`` (``<fault>.hit<k>``, holding the process id), so
``times`` survives the death of the process it killed and a test can see which process to kill. Faults
are also read from ``SEGQ_FAULTS_DIR/faults`` at every point, so a test can arm one in running workers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from segq.settings import get_settings

logger = logging.getLogger("segq.faults")

ACTIONS = ("cuda_error", "kill", "raise", "pause", "oom", "refuse", "skew")
POINTS = ("in_prepare", "in_stream_rows", "in_read_rows", "in_infer_slab", "in_engine_batch", "in_gate",
          "in_add_partial", "before_merge_rename", "before_merge_finish",
          "in_submit", "in_input_hash", "at_start")
CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


@dataclass(frozen=True)
class Fault:
    text: str
    action: str
    point: str
    match: dict[str, str] = field(default_factory=dict)
    times: int | None = None
    seconds: float = 30.0
    above: int | None = None  # fire only where the context's ``batch`` is larger (a ROI batch too big to fit)

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.text)


def parse(spec: str) -> list[Fault]:
    """The faults named in ``spec``; ValueError for anything not understood (a typo must not pass silently)."""
    faults = []
    for text in filter(None, (part.strip() for part in spec.split(","))):
        name, *options = text.split(":")
        action = next((a for a in ACTIONS if name.startswith(a + "_")), None)
        point = name[len(action) + 1:] if action else ""
        if action is None or point not in POINTS:
            raise ValueError(f"SEGQ_FAULTS: {name!r} is not <action>_<point> with action in {ACTIONS} "
                             f"and point in {POINTS}")
        values = dict(option.split("=", 1) for option in options if "=" in option)
        times = int(values.pop("times")) if "times" in values else None
        seconds = float(values.pop("seconds", 30.0))
        above = int(values.pop("above")) if "above" in values else None
        faults.append(Fault(text, action, point, values, times, seconds, above))
    return faults


def _armed(faults_dir: Path | None, spec: str) -> list[Fault]:
    extra = ""
    if faults_dir is not None:
        armed = faults_dir / "faults"
        extra = armed.read_text() if armed.is_file() else ""
    return parse(",".join(filter(None, [spec, extra.replace("\n", ",")])))


def _take(fault: Fault, faults_dir: Path | None, context: dict[str, object]) -> bool:
    """Claim the next hit of ``fault`` (atomically, across processes); False once ``times`` are used up."""
    if faults_dir is None:
        return True
    faults_dir.mkdir(parents=True, exist_ok=True)
    k = 1
    while fault.times is None or k <= fault.times:
        try:
            fd = os.open(faults_dir / f"{fault.key}.hit{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            k += 1
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "time": time.time(), **{k: str(v) for k, v in context.items()}}, handle)
        return True
    return False


def hits(faults_dir: Path, text: str) -> list[dict[str, str]]:
    """The recorded hits of the fault written ``text`` (for tests), oldest first."""
    key = Fault(text, "", "").key
    files = sorted(faults_dir.glob(f"{key}.hit*"), key=lambda p: int(p.name.rsplit(".hit", 1)[1]))
    return [json.loads(p.read_text() or "{}") for p in files]


def point(name: str, **context: object) -> None:
    """A place where a test may inject a fault; does nothing unless faults are configured."""
    settings = get_settings()
    if not settings.faults and settings.faults_dir is None:
        return
    for fault in _armed(settings.faults_dir, settings.faults):
        if fault.point != name or any(str(context.get(k)) != v for k, v in fault.match.items()):
            continue
        if fault.above is not None and int(str(context.get("batch", 0))) <= fault.above:
            continue
        if _take(fault, settings.faults_dir, context):
            _act(fault, context)


def _act(fault: Fault, context: dict[str, object]) -> None:
    where = ", ".join(f"{k}={v}" for k, v in context.items())
    logger.warning("TEST FAULT %s at %s (%s) in process %d", fault.action, fault.point, where, os.getpid())
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "skew":
        skew_clock(fault.seconds)
    elif fault.action == "pause":
        time.sleep(fault.seconds)
    elif fault.action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"simulated CUDA out of memory (injected by SEGQ_FAULTS {fault.text}, {where})")
    elif fault.action == "refuse":
        from segq.errors import EngineRefusedError

        raise EngineRefusedError(f"accuracy gate refused the engine (injected by SEGQ_FAULTS {fault.text}, {where}). "
                                 f"{EngineRefusedError.HINT}")
    elif fault.action == "cuda_error":
        _break_cuda()
        raise RuntimeError(f"{CUDA_ERROR} (injected by SEGQ_FAULTS {fault.text}, {where})")
    else:
        raise RuntimeError(f"injected fault {fault.text} ({where})")


def _break_cuda() -> None:
    """On a GPU, break this process's CUDA context for real (a device-side assert: every later CUDA call
    fails) and let torch raise its own error; without one, the caller raises the message such a context gives."""
    import torch

    if torch.cuda.is_available():
        index = torch.tensor([1 << 20], device="cuda")
        torch.zeros(1, device="cuda")[index].cpu()  # out of bounds on the device: raises, context unusable


def skew_clock(seconds: float) -> None:
    """Shift ``time.time`` of this process (and of the processes it forks) by ``seconds``: a machine whose clock is
    off. Installed before Celery and kombu are imported, so their ``from time import time`` takes it too."""
    real = getattr(time.time, "segq_real", time.time)

    def skewed() -> float:
        return float(real() + seconds)

    skewed.segq_real = real  # type: ignore[attr-defined]
    time.time = skewed
    time.time_ns = lambda: int(skewed() * 1e9)
