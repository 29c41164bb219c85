"""How many threads a plain `segq worker`'s processes use: the host's cores shared among every segq worker process
on it, as the ``--gpus`` launcher shares them among its children (worker/launcher.py sets their OMP_NUM_THREADS).

Two plain workers on a 2-core machine each ran torch with a thread a core in each pool process: 4 threads fought
over 2 cores and a dataset one worker did in 30 s took 178 s (18 s with OMP_NUM_THREADS=1). The rule: each
process gets ``cores // processes`` threads (at least 1), where processes are the pool processes of every plain
worker on this host, counted from a lock file that each worker holds while it lives (``registry``). It is read
again before each task, so a worker that starts or stops later changes the others' share from their next task.
An OMP_NUM_THREADS set by the user, or by the launcher for its children, wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path
from typing import IO

logger = logging.getLogger("segq.threads")

_held: list[IO[str]] = []  # this process's registration, open (and locked) while it lives


def share(cores: int, processes: int) -> int:
    """Threads each of ``processes`` worker processes may use on ``cores`` cores: an equal share, at least one."""
    return max(1, cores // max(processes, 1))


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a container's cpuset), else every core."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def registry() -> Path:
    """Where this host's plain workers register (one folder a user, so users do not share or block each other)."""
    return Path(tempfile.gettempdir()) / f"segq-workers-{os.getuid()}"


def register(processes: int, folder: Path | None = None) -> Path:
    """Count this worker's ``processes`` pool processes in the host's share until the process ends."""
    folder = folder or registry()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.{processes}"
    handle = open(path, "w")  # noqa: SIM115 - held open for the life of the process: the lock is the registration
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(handle)
    return path


def registered(folder: Path | None = None) -> int:
    """Pool processes of the live plain workers on this host; a file whose worker died (its lock free) is removed."""
    folder = folder or registry()
    total = 0
    for path in folder.glob("*.*") if folder.is_dir() else []:
        try:
            processes = int(path.name.rsplit(".", 1)[1])
        except ValueError:
            continue
        if _alive(path):
            total += processes
    return total


def _alive(path: Path) -> bool:
    if any(h.name == str(path) for h in _held):
        return True
    try:
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # its worker holds it
    except FileNotFoundError:
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return False


def registered_here() -> bool:
    """True in a worker that registered (and in the pool processes it forked, which inherit the registration)."""
    return bool(_held)


def apply(folder: Path | None = None) -> int:
    """Set torch's threads in this process to its share now; returns the share."""
    import torch

    threads = share(host_cores(), registered(folder))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch uses %d thread(s) in this process: %d core(s) shared by the segq worker processes on "
                    "this host (set OMP_NUM_THREADS to choose)", threads, host_cores())
    return threads
