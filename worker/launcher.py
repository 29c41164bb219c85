"""``segq worker --gpus``: one Celery worker process per GPU plus one coordinator process, kept alive.

Why a launcher and not ``celery worker -c N``: a prefork pool forks its children from one parent, and
a CUDA context does not survive a fork, so each GPU needs a process of its own that learns its GPU
from ``CUDA_VISIBLE_DEVICES`` before anything imports torch. This module never touches CUDA: it counts
GPUs with ``nvidia-smi -L`` (or torch in a throwaway subprocess) and starts every worker as a fresh
``segq worker`` process with the variable already in its environment.

The CPU work of a job (load, preprocess, merge, write) runs in a separate coordinator process, so a
GPU worker never sits on it. A child that dies is restarted with a growing delay; one that keeps dying
within seconds of its start is given up with an error; one that exits 0 left on purpose (``--max-idle``, or
a SIGTERM of its own) and is not restarted. The work a child that died by surprise was running is handed back at
once (``on_death``: its jobs start new attempts), not left to the visibility timeout. SIGTERM (or Ctrl-C) is
passed on as Celery's warm shutdown: GPU parts that end within SEGQ_STOP_GRACE finish, the others are handed back,
then everything exits (worker/leaving.py); a second one, or SIGQUIT, is a cold one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from celery.utils.nodenames import host_format

from segq.names import EXIT_CONFIG, EXIT_ENGINE_BROKEN, FINISH_QUEUE, GPU_QUEUE, PREPARE_QUEUE, consumed_queues

logger = logging.getLogger("segq.launcher")

ROLES = ("all", "gpu", "coordinator")
GPUS_HELP = "all | N (the first N) | 0,2 (these indexes; '3,' for GPU 3 alone) | none (CPU workers)"
POLL_SECONDS = 0.5
# A child that ends with these codes handed its running message back itself (worker/steps.py, EXIT).
HANDED_BACK = (EXIT_ENGINE_BROKEN, EXIT_CONFIG)


@dataclass(frozen=True)
class Gpu:
    """One GPU a worker is pinned to: its position among the visible GPUs and its CUDA_VISIBLE_DEVICES value."""

    ordinal: int
    device: str

    @property
    def label(self) -> str:
        """The index in the node name: the device number when it is one, else the position (UUIDs, MIG)."""
        return self.device if self.device.isdigit() else str(self.ordinal)


def visible_devices(cuda_visible: str | None, count: Callable[[], int]) -> list[str]:
    """The GPUs this launcher may hand out, as CUDA_VISIBLE_DEVICES values.

    When the launcher itself runs under CUDA_VISIBLE_DEVICES (a container, a shared box), only those
    devices exist for it, and a child pinned to "1" must get the second entry, not physical GPU 1.
    """
    if cuda_visible is not None:
        entries = [e.strip() for e in cuda_visible.split(",") if e.strip()]
        return [] if entries in ([], ["-1"]) else entries
    return [str(i) for i in range(count())]


def parse_gpus(spec: str, visible: Sequence[str]) -> list[Gpu]:
    """The GPUs ``--gpus`` selects: ``all``, a count ``N``, indexes ``0,2`` (``3,`` alone) or ``none`` (empty)."""
    text = spec.strip().lower()
    shown = f"{len(visible)} GPU(s) are visible" + (f" ({', '.join(visible)})" if visible else "")
    if text == "none":
        return []
    if text == "all":
        if not visible:
            raise ValueError("--gpus all: no GPU is visible on this machine; use --gpus none for CPU workers")
        return [Gpu(i, d) for i, d in enumerate(visible)]
    if text.isdigit() and "," not in text:
        count = int(text)
        if count == 0:
            raise ValueError("--gpus 0 asks for no GPU worker; use --gpus none for CPU workers, or '0,' for GPU 0")
        if count > len(visible):
            raise ValueError(f"--gpus {count} asks for {count} GPU workers but {shown}")
        return [Gpu(i, visible[i]) for i in range(count)]
    parts = [p.strip() for p in text.split(",")]
    if "," not in text or not all(p.isdigit() for p in parts if p) or not any(parts):
        raise ValueError(f"--gpus {spec!r}: expected {GPUS_HELP}")
    indexes = [int(p) for p in parts if p]
    if len(set(indexes)) != len(indexes):
        raise ValueError(f"--gpus {spec!r} names a GPU twice")
    missing = [i for i in indexes if i >= len(visible)]
    if missing:
        raise ValueError(f"--gpus {spec!r}: GPU {missing[0]} does not exist here; {shown} (indexes from 0)")
    return [Gpu(i, visible[i]) for i in indexes]


def count_gpus(timeout: float = 60) -> int:
    """GPUs on this machine, counted outside this process so that it never initialises CUDA."""
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        result = None
    if result is not None:
        if result.returncode != 0:
            logger.warning("nvidia-smi -L failed (%s): counting no GPU", (result.stderr or result.stdout).strip())
            return 0
        return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=timeout)
    if probe.returncode != 0:
        logger.warning("no nvidia-smi and torch cannot count GPUs: counting none")
        return 0
    return int(probe.stdout.strip().splitlines()[-1])


def node_name(role: str, hostname: str | None) -> str:
    """``gpu0@<host>``; ``-n HOST`` replaces the host, ``-n NAME@HOST`` gives ``gpu0-NAME@HOST``."""
    if not hostname:
        return host_format(f"{role}@%h")
    name, sep, host = hostname.rpartition("@")
    if not sep:
        return host_format(f"{role}@{hostname}")
    return host_format(f"{role}-{name}@{host}" if name else f"{role}@{host}")


@dataclass(frozen=True)
class ChildSpec:
    """One worker process the launcher keeps running."""

    name: str
    argv: list[str]
    env: dict[str, str]


def worker_argv(name: str, queues: list[str], concurrency: int, loglevel: str, extra: Sequence[str],
                pool: str = "prefork") -> list[str]:
    """A plain ``segq worker`` (no --gpus) with a fixed name, queues and pool: what each child runs."""
    return [sys.executable, "-m", "segq.cli", "worker", "-n", name, "-c", str(concurrency), "--pool", pool,
            "-Q", ",".join(queues), "-l", loglevel, *extra]


def coordinator_processes(device_workers: int, cpu_count: int | None = None) -> int:
    """Processes of the coordinator (load, preprocess, merge, write) when not given: it must keep
    ``device_workers`` busy, so 8 a device worker, but never more than the cores the workers leave (at least 2).

    One process prepares or merges about two BraTS-size volumes a second, and a GPU infers about two; a MONAI
    bundle's CT takes 1.4 s to prepare (load, orientation, 1.5 mm spacing: bench/results/bundle_dataset_h200.jsonl)
    against 0.35 s on the GPU, so about four prepare for each volume a GPU runs, plus the merges.
    """
    cores = cpu_count or os.cpu_count() or 1
    return max(2, min(8 * max(device_workers, 1), cores - device_workers))


def plan_children(gpus: list[Gpu] | None, *, cpu_workers: int = 1, role: str = "all", hostname: str | None = None,
                  coordinator_concurrency: int | None = None, loglevel: str = "INFO", extra: Sequence[str] = (),
                  base_env: dict[str, str] | None = None, cpu_count: int | None = None,
                  prefetch: int = 2) -> list[ChildSpec]:
    """The processes to run: a worker per GPU (``gpus``) or ``cpu_workers`` CPU workers (``gpus`` None),
    each consuming only the gpu queues, plus one coordinator process unless ``role`` is ``gpu``.

    A device worker runs ``prefetch`` tasks in threads (one process, one engine, one CUDA context): one
    holds the device while the others read their input and write their partial (worker/runtime.py).
    The coordinator polls the finish queues before the prepare queues: merges before new volumes.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    env = dict(base_env or {})
    children: list[ChildSpec] = []
    if role != "coordinator":
        # (name, CUDA_VISIBLE_DEVICES): an empty value hides every GPU from a CPU worker.
        slots = [(f"gpu{g.label}", g.device) for g in gpus] if gpus is not None else \
            [(f"cpu{i}", "") for i in range(cpu_workers)]
        threads = str(max(1, (cpu_count or os.cpu_count() or 1) // max(len(slots), 1)))
        for role_name, device in slots:
            name = node_name(role_name, hostname)
            child_env = {**env, "CUDA_VISIBLE_DEVICES": device}
            # N workers on one machine each using every core would fight over them.
            child_env.setdefault("OMP_NUM_THREADS", threads)
            children.append(ChildSpec(name, worker_argv(name, consumed_queues(GPU_QUEUE), prefetch, loglevel, extra,
                                                        pool="threads"), child_env))
    if role != "gpu":
        name = node_name("coord", hostname)
        devices = len(gpus) if gpus is not None else cpu_workers
        processes = coordinator_concurrency or coordinator_processes(devices, cpu_count)
        # Each process's torch and OpenMP would otherwise start a thread a core: 16 processes x 64 threads on a
        # 64-core host starve the GPU workers' kernel launches. The cores are shared among them instead.
        cores = str(max(1, (cpu_count or os.cpu_count() or 1) // processes))
        children.append(ChildSpec(name, worker_argv(name, consumed_queues(FINISH_QUEUE, PREPARE_QUEUE),
                                                    processes, loglevel, extra),
                                  {"OMP_NUM_THREADS": cores, **env, "CUDA_VISIBLE_DEVICES": ""}))
    return children


@dataclass(frozen=True)
class RestartPolicy:
    """A child that ran less than ``fast_seconds`` crashed fast; ``max_fast_crashes`` in a row and it is given up."""

    initial_delay: float = 1.0
    max_delay: float = 60.0
    fast_seconds: float = 60.0
    max_fast_crashes: int = 5

    def delay(self, fast_crashes: int) -> float:
        return min(self.initial_delay * 2 ** max(fast_crashes - 1, 0), self.max_delay)


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    starts: int = 0
    fast_crashes: int = 0
    restart_at: float | None = None
    given_up: bool = False
    left: bool = False  # exited 0 on its own (idle, or its own SIGTERM): not restarted
    pending: bytes = b""
    exit_codes: list[int] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM (a warm shutdown) if the launcher itself is killed."""
    if sys.platform.startswith("linux"):
        import ctypes

        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)


class Launcher:
    """Starts the children, relays their output line by line with their name, restarts the dead, stops on signal."""

    def __init__(self, specs: Sequence[ChildSpec], policy: RestartPolicy | None = None,
                 out: BinaryIO | None = None, on_death: Callable[[str, int], None] | None = None) -> None:
        if not specs:
            raise ValueError("nothing to launch: no GPU worker, CPU worker or coordinator was asked for")
        self.children = [Child(spec) for spec in specs]
        self.policy = policy or RestartPolicy()
        self.out = out or sys.stdout.buffer
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.stopping: str | None = None  # None, "warm" or "cold"
        # Called with (node name, exit code) when a child dies by surprise: its work is handed back at once.
        self.on_death = on_death

    def run(self) -> int:
        """Run until a signal stops every child (0) or every child has been given up (1)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)}
        try:
            for child in self.children:
                self._start(child)
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.selector.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def _loop(self) -> int:
        while True:
            self._handle_signals()
            for key, _ in self.selector.select(POLL_SECONDS):
                if not self._read(key.data):
                    self._unregister(key.data)
                self._relay(key.data)
            now = time.monotonic()
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    self._reap(child, now)
                if child.restart_at is not None and now >= child.restart_at and not self.stopping:
                    self._start(child)
            if self.stopping and not any(c.proc is not None for c in self.children):
                logger.info("every worker has stopped (%s shutdown)", self.stopping)
                return 0
            if all(c.given_up for c in self.children):
                logger.error("every worker process was given up after repeated crashes: exiting")
                return 1
            if all(c.given_up or c.left for c in self.children):
                given_up = any(c.given_up for c in self.children)
                logger.log(logging.ERROR if given_up else logging.INFO, "every worker process left on its own "
                           "(--max-idle or SIGTERM)%s: exiting", " or was given up" if given_up else "")
                return 1 if given_up else 0

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            cold = signum == signal.SIGQUIT or self.stopping is not None
            if cold and self.stopping == "cold":
                continue
            self.stopping = "cold" if cold else "warm"
            forward = signal.SIGQUIT if cold else signal.SIGTERM
            logger.warning("%s received: %s shutdown of %d worker(s)%s", signal.Signals(signum).name,
                           self.stopping, sum(c.running for c in self.children),
                           "; running tasks are cut short and handed back" if cold else
                           "; parts that end within SEGQ_STOP_GRACE finish, the others are handed back (send it again, "
                           "or SIGQUIT, to cut them short)")
            for child in self.children:
                child.restart_at = None
                if child.running:
                    assert child.proc is not None
                    os.kill(child.proc.pid, forward)

    def _start(self, child: Child) -> None:
        child.restart_at = None
        child.proc = subprocess.Popen(child.spec.argv, env=child.spec.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        child.started = time.monotonic()
        child.starts += 1
        assert child.proc.stdout is not None
        os.set_blocking(child.proc.stdout.fileno(), False)
        self.selector.register(child.proc.stdout, selectors.EVENT_READ, child)
        device = child.spec.env.get("CUDA_VISIBLE_DEVICES")
        where = f"GPU {device}" if device else "no GPU"
        logger.info("%s %s (pid %d, %s)", "started" if child.starts == 1 else "restarted", child.spec.name,
                    child.proc.pid, where)

    def _read(self, child: Child) -> bool:
        """Take what the child's pipe holds now into its buffer; False once the pipe is closed."""
        assert child.proc is not None and child.proc.stdout is not None
        while True:
            try:
                data = os.read(child.proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                return True
            if not data:
                return False
            child.pending += data

    def _relay(self, child: Child, final: bool = False) -> None:
        """Copy the child's complete lines to our output, each prefixed with its node name."""
        lines = child.pending.split(b"\n")
        child.pending = lines.pop()
        if final and child.pending:
            lines.append(child.pending)
            child.pending = b""
        if lines:
            prefix = f"[{child.spec.name}] ".encode()
            self.out.write(b"".join(prefix + line + b"\n" for line in lines))
            self.out.flush()

    def _unregister(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        with contextlib.suppress(KeyError):
            self.selector.unregister(child.proc.stdout)

    def _reap(self, child: Child, now: float) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        # Celery's pool processes share the child's process group; none may outlive it (a pid is not
        # reused while its group has members, so this reaches only stragglers of this child).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        self._read(child)
        self._relay(child, final=True)
        self._unregister(child)
        child.proc.stdout.close()
        code = child.proc.returncode
        child.exit_codes.append(code)
        child.proc = None
        if self.stopping:
            logger.info("%s stopped (exit code %d)", child.spec.name, code)
            return
        ran = now - child.started
        if code == 0:
            child.left = True
            logger.info("%s left on its own (exit code 0: --max-idle, or a SIGTERM sent to it): not restarting it",
                        child.spec.name)
            return
        if self.on_death is not None and code not in HANDED_BACK:
            self.on_death(child.spec.name, code)
        if code == EXIT_CONFIG:
            child.given_up = True
            logger.error("%s cannot start as configured (exit code %d): not restarting it; its output above says "
                         "what to fix, then start the workers again. The other workers keep running.",
                         child.spec.name, code)
            return
        child.fast_crashes = child.fast_crashes + 1 if ran < self.policy.fast_seconds else 1
        if child.fast_crashes >= self.policy.max_fast_crashes:
            child.given_up = True
            logger.error("%s died %d times within %.0f s of starting (last exit code %d): giving it up; its output "
                         "above says why. The other workers keep running.", child.spec.name, child.fast_crashes,
                         self.policy.fast_seconds, code)
            return
        delay = self.policy.delay(child.fast_crashes)
        child.restart_at = now + delay
        logger.warning("%s died (exit code %d after %.1f s): restarting in %.1f s", child.spec.name, code, ran, delay)
