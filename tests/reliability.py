"""What the fault tests (tests/integration/test_reliability_*.py) share: a deployment of their own on a
throwaway Redis, and the check every scenario ends with: nothing lost.

Nothing lost means: one job row per output, each in a final state; an output only for a done job, and it
loads and matches MONAI's sliding_window_inference on the same volume; no temp files, no workspaces; no
message left in Redis (every queue empty, the ``unacked`` hash empty).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import ROOT, WorkerProcess, environment, load_mask, reference_probability
from tests.redis_server import RedisServer

# A short visibility timeout, so a message of a worker that died whole comes back within the test
# (the settings refuse less than 20 s); the task limit must stay below it. A GPU machine's first CUDA
# call in a fresh process can take longer than that: raise it there with SEGQ_TEST_TASK_TIME_LIMIT.
TASK_TIME_LIMIT = int(os.environ.get("SEGQ_TEST_TASK_TIME_LIMIT", "24"))
VISIBILITY_TIMEOUT = TASK_TIME_LIMIT + 1
# Every throwaway Redis wants a password (as the shipped configuration does); no log may show it.
PASSWORD = "s3cret-Redis-pw"


@dataclass
class JobRow:
    id: str
    dataset_id: str
    input_path: str
    output_path: str
    out_dir: str
    status: str
    error: str | None
    attempt: int
    deliveries: dict[int, int] = field(default_factory=dict)


@dataclass
class Deployment:
    """One isolated segq: throwaway Redis (AOF), SQLite, storage, faults directory, real workers."""

    root: Path
    redis: RedisServer
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def faults_dir(self) -> Path:
        return Path(self.env["SEGQ_FAULTS_DIR"])

    @property
    def storage(self) -> Path:
        return Path(self.env["SEGQ_STORAGE"])

    def worker(self, name: str = "w1", queues: str | None = None, env: dict[str, str] | None = None,
               concurrency: int = 1) -> WorkerProcess:
        extra = ["-Q", queues] if queues else []
        proc = WorkerProcess({**self.env, **(env or {})}, name, self.root / f"{name}-{len(self.workers)}.log",
                             extra=extra, concurrency=concurrency)
        self.workers.append(proc)
        return proc.start()

    def arm(self, spec: str) -> None:
        """Arm faults in running workers (read at every fault point)."""
        self.faults_dir.mkdir(parents=True, exist_ok=True)
        (self.faults_dir / "faults").write_text(spec)

    def submit(self, inputs: list[Path], out: Path, model: Path, **kwargs: Any) -> Any:
        """Submit in this process, as `segq submit` does (same checks, same rows, same messages)."""
        from producer.scan import collect_inputs
        from producer.submit import submit
        from segq.pipeline.toml import load_model_spec

        items = collect_inputs(inputs, out.resolve())
        return submit(items, out, load_model_spec(model), **kwargs)

    def segq(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "segq.cli", *args], env={**os.environ, **self.env}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def wait(self, timeout: float = 120, poll: float = 0.5) -> list[JobRow]:
        """Every job of every dataset in a final state; AssertionError with the rows after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.jobs()
            if rows and all(r.status in ("done", "failed", "cancelled") for r in rows):
                return rows
            if time.monotonic() > deadline:
                logs = "\n".join(w.read_log()[-3000:] for w in self.workers)
                raise AssertionError(f"jobs not final after {timeout}s: {rows}\n{logs}")
            time.sleep(poll)

    def jobs(self) -> list[JobRow]:
        from sqlalchemy import select

        from segq.db import session_scope
        from segq.models import Dataset, Job, Subtask

        with session_scope() as s:
            rows = []
            for job, out_dir in s.execute(select(Job, Dataset.out_dir).join(Dataset).order_by(Job.input_path)):
                parts = s.scalars(select(Subtask).where(Subtask.job_id == job.id, Subtask.attempt == job.attempt))
                rows.append(JobRow(job.id, job.dataset_id, job.input_path, job.output_path, out_dir,
                                   job.status.value, job.error, job.attempt, {p.slab: p.deliveries for p in parts}))
            return rows

    def log(self) -> str:
        return "\n".join(w.read_log() for w in self.workers)

    def stop(self) -> None:
        for proc in self.workers:
            proc.kill()
        self.workers.clear()


@contextmanager
def deployment(root: Path, *, appendonly: bool = True, **settings: str) -> Iterator[Deployment]:
    """A deployment on a fresh throwaway Redis (``appendonly=False``: one that a restart leaves empty); workers
    and Redis are killed on the way out, whatever happens."""
    redis = RedisServer(root / "redis", password=PASSWORD, appendonly=appendonly).start()
    env = {
        "SEGQ_BROKER_URL": redis.url(0),
        "SEGQ_DATABASE_URL": f"sqlite:///{root / 'segq.db'}",
        "SEGQ_DATA_DIR": str(root / "data"),
        "SEGQ_STORAGE": str(root / "storage"),
        "SEGQ_FAULTS_DIR": str(root / "faults"),
        "SEGQ_MAX_WINDOWS_PER_SUBTASK": "4",
        "SEGQ_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "SEGQ_TASK_TIME_LIMIT": str(TASK_TIME_LIMIT),
        "SEGQ_WATCHDOG_INTERVAL": "0",
        "SEGQ_DEAD_WORKER_INTERVAL": "0",  # on only where a test looks at it (scenario 24)
        **settings,
    }
    dep = Deployment(root, redis, env)
    try:
        with environment(env):
            from segq.db import upgrade

            upgrade(env["SEGQ_DATABASE_URL"])
            yield dep
    finally:
        dep.stop()
        redis.stop()




def assert_mask_matches(mask_path: Path, volume_path: Path, model_toml: Path) -> None:
    """Equal to the reference's mask wherever the reference is clear of 0.5; the reference runs on the CPU,
    and a worker on a GPU convolves in TF32 (cuDNN's default for fp32 on Ampere and later): wider margin."""
    import torch

    reference = reference_probability(volume_path, model_toml)
    mask = load_mask(mask_path)
    assert mask.shape == reference.shape and mask.dtype == np.uint8
    decided = np.abs(reference - 0.5) > (5e-3 if torch.cuda.is_available() else 1e-4)
    np.testing.assert_array_equal(mask[decided], (reference >= 0.5)[decided].astype(np.uint8))


def temp_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob(".*.tmp-*")]


def wait_drained(dep: Deployment, timeout: float = 30) -> dict[str, int]:
    """Wait for Redis to hold no message (acks come just after the job row is written)."""
    deadline = time.monotonic() + timeout
    while (left := dep.redis.pending()) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


def assert_nothing_lost(dep: Deployment, model: Path, *, done: set[str] | None = None,
                        drain_timeout: float = 30) -> list[JobRow]:
    """The end check of every scenario; ``done`` names the inputs (file names) that must be done, the rest failed."""
    rows = dep.wait(timeout=5)
    outputs = Counter(r.output_path for r in rows)
    assert all(n == 1 for n in outputs.values()), f"more than one row for an output: {outputs}"
    for row in rows:
        output = Path(row.output_path)
        name = Path(row.input_path).name
        if done is not None:
            expected = "done" if name in done else "failed"
            assert row.status == expected, f"{name}: {row.status} ({row.error}), expected {expected}"
        if row.status == "done":
            assert_mask_matches(output, Path(row.input_path), model)
        else:
            assert row.error, f"{name}: {row.status} without a reason"
            assert not output.exists(), f"{output} exists but its job is {row.status}"
    # A failed job's other subtasks and its merge may still be running when its row turns final; they
    # clean up after themselves, and acknowledge (late) only once they have: drain first, then look.
    pending = wait_drained(dep, drain_timeout)
    assert not pending, f"messages left in Redis: {pending}"
    out_dirs = {Path(r.out_dir) for r in rows}
    assert not temp_files(*out_dirs, dep.storage), f"temp files left: {temp_files(*out_dirs, dep.storage)}"
    jobs_dir = dep.storage / "jobs"
    left = [p for p in jobs_dir.rglob("*")] if jobs_dir.exists() else []
    assert not left, f"workspaces left: {left[:10]}"
    assert PASSWORD not in dep.log(), "the broker password reached a worker log"
    return rows


def slab_paused_on_w1(dep: Deployment, scan: Path, out: Path, model: Path, slab: int = 1) -> WorkerProcess:
    """Worker w1 started, ``scan`` submitted, and w1 held in ``slab`` for 120 s (a fault): the moment at which the
    kill scenarios take w1 away mid-part."""
    from segq import faults

    pause = f"pause_in_infer_slab:slab={slab}:times=1:seconds=120"
    dep.arm(pause)
    w1 = dep.worker("w1")
    dep.submit([scan], out, model)
    hit = wait_for(lambda: faults.hits(dep.faults_dir, pause), 90, f"slab {slab} to start")
    assert int(hit[0]["pid"]) in w1.children(), f"slab {slab} must be running on w1"
    return w1


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def figure(scenario: str, text: str) -> None:
    """Record a measured figure for docs/RELIABILITY.md (appended to $SEGQ_RELIABILITY_FIGURES when set)."""
    line = f"{scenario}: {text}"
    print(f"FIGURE {line}")
    target = os.environ.get("SEGQ_RELIABILITY_FIGURES")
    if target:
        with open(target, "a") as handle:
            handle.write(line + "\n")
