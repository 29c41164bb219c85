"""Workers that join and leave mid-dataset (issue 22), and the backlog an autoscaler reads, with real workers.

Each test runs its own deployment (throwaway Redis, SQLite): a coordinator process, GPU-role workers as the
launcher runs them (threads pool, gpu queues only, on the CPU here), and the end check every fault scenario
ends with (``assert_nothing_lost``: every mask equal to MONAI's, nothing left in Redis or storage).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from segq import scheduler
from segq.names import FINISH_QUEUE, GPU_QUEUE, PREPARE_QUEUE, consumed_queues
from tests.helpers import ROOT, WorkerProcess, write_volume
from tests.reliability import Deployment, assert_nothing_lost, deployment, figure, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (64, 40, 36)  # at ROI 32, overlap 0.5: 12 windows, 3 parts of 4 (SEGQ_MAX_WINDOWS_PER_SUBTASK=4)
WINDOWS, PARTS = 12, 3


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path, SEGQ_LOOKAHEAD="1", SEGQ_ADMIT_INTERVAL="1") as d:
        yield d


def _scans(directory: Path, n: int) -> list[Path]:
    return [write_volume(directory / f"v{k:02d}.nii.gz", SHAPE, seed=k) for k in range(n)]


def coordinator(dep: Deployment, name: str = "coord") -> WorkerProcess:
    """The launcher's coordinator process: merges first, then prepares."""
    return dep.worker(name, queues=",".join(consumed_queues(FINISH_QUEUE, PREPARE_QUEUE)), concurrency=2)


def gpu_worker(dep: Deployment, name: str, extra: list[str] | None = None, env: dict[str, str] | None = None,
               start: bool = True) -> WorkerProcess:
    """A GPU-role worker as the launcher runs it (threads pool, two tasks in flight, gpu queues only)."""
    queues = ",".join(consumed_queues(GPU_QUEUE))
    proc = WorkerProcess({**dep.env, **(env or {})}, name, dep.root / f"{name}-{len(dep.workers)}.log",
                         extra=["-Q", queues, "--pool", "threads", *(extra or [])], concurrency=2)
    dep.workers.append(proc)
    return proc.start() if start else proc


def gauge(text: str, name: str) -> float:
    """The value of an unlabelled gauge in a Prometheus exposition."""
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the exposition:\n{text}"
    return float(match.group(1))


def test_backlog_metrics_count_a_known_backlog(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Issue 22 item 5: with no GPU worker, 5 volumes of 12 windows, a window of 2 (one GPU counted, look-ahead
    1): 3 volumes wait in SQL, 2 are admitted and prepared, their 6 parts hold 24 windows. A GPU worker then
    drains it all, and every figure falls to 0."""
    from segq.metrics_http import exposition

    coordinator(dep)
    dep.submit(_scans(tmp_path / "scans", 5), tmp_path / "out", unet_model)

    def settled() -> str | None:
        text = exposition()
        return text if gauge(text, "segq_gpu_parts_queued") == 2 * PARTS else None

    text = wait_for(settled, 120, "both admitted volumes prepared")
    assert gauge(text, "segq_volumes_queued") == 3
    assert gauge(text, "segq_volumes_admitted") == 2
    assert gauge(text, "segq_gpu_windows_queued") == 2 * WINDOWS
    assert gauge(text, "segq_gpu_workers") == 0
    assert 'segq_up{source="backlog"} 1' in text
    figure("autoscaler signal", "5 volumes, no GPU worker: segq_volumes_queued 3, segq_volumes_admitted 2, "
           f"segq_gpu_parts_queued {2 * PARTS}, segq_gpu_windows_queued {2 * WINDOWS}, segq_gpu_workers 0")
    gpu_worker(dep, "gpu1")
    dep.wait(timeout=300)
    assert_nothing_lost(dep, unet_model)
    after = exposition()
    for name in ("segq_volumes_queued", "segq_volumes_admitted", "segq_gpu_parts_queued", "segq_gpu_windows_queued"):
        assert gauge(after, name) == 0, name
    assert gauge(after, "segq_gpu_workers") == 1


def _first_part_started(worker: str) -> float | None:
    """When ``worker`` started its first GPU part (unix time), from the subtask rows."""
    from sqlalchemy import func, select

    from segq.db import session_scope
    from segq.models import Subtask

    with session_scope() as s:
        first = s.scalar(select(func.min(Subtask.started_at)).where(Subtask.worker.like(f"{worker}@%")))
    return first.timestamp() if first is not None else None


def _log_time(proc: WorkerProcess, text: str, timeout: float) -> float:
    """The moment ``text`` appears in the worker's log (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while text not in proc.read_log():
        assert time.monotonic() < deadline, f"{text!r} not in {proc.name}'s log:\n{proc.read_log()[-4000:]}"
        assert proc.proc is None or proc.proc.poll() is None, proc.read_log()[-4000:]
        time.sleep(0.05)
    return time.time()


def test_a_worker_that_joins_mid_dataset_takes_work_within_seconds(dep: Deployment, unet_model: Path,
                                                                     tmp_path: Path) -> None:
    """Issue 22 item 3: one GPU worker runs a dataset (each part 2 s: a pause in each ROI batch); a second one
    starts mid-dataset. It builds its engine before it consumes, runs a part within seconds of its ready line,
    the admission window and the split rule count 2 GPUs, `segq watch` says it joined, and every mask is MONAI's."""
    slow = {"SEGQ_FAULTS": "pause_in_engine_batch:seconds=2"}
    coordinator(dep)
    gpu_worker(dep, "gpu1", env=slow)
    out = tmp_path / "out"
    dep.submit(_scans(tmp_path / "scans", 8), out, unet_model, name="joining")
    watch = subprocess.Popen([sys.executable, "-m", "segq.cli", "watch", "joining", "--poll", "0.5"],
                             env={**os.environ, **dep.env}, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(r.status == "done" for r in dep.jobs()), 180, "the first volume done")
        assert scheduler.gpu_workers() == 1
        joiner = gpu_worker(dep, "gpu2", env=slow, start=False)
        starting = threading.Thread(target=joiner.start, kwargs={"timeout": 180}, daemon=True)
        starting.start()
        ready = _log_time(joiner, "joining: taking GPU work now", 180)
        first = wait_for(lambda: _first_part_started("gpu2"), 60, "gpu2's first part")
        starting.join(60)
        wait_for(lambda: scheduler.gpu_workers() == 2, 30, "the heartbeat of 2 GPU workers")
        wait_for(lambda: scheduler.in_flight() > 2, 60, "the admission window grown past one GPU's 2 volumes")
        dep.wait(timeout=300)
        output = watch.communicate(timeout=60)[0]
    finally:
        if watch.poll() is None:
            watch.kill()
    log = dep.log()
    assert "Received task" not in joiner.read_log().split("joining: taking GPU work now")[0], \
        "the joiner took a message before its engine was ready"
    assert re.search(r"in \d part\(s\): 2 GPU worker\(s\)", log), "the split rule never saw 2 GPU workers"
    assert re.search(r"gpu2@\S+ joined", output), output
    rows = assert_nothing_lost(dep, unet_model)
    assert all(r.status == "done" for r in rows)
    figure("join", f"ready to first part {first - ready:.2f} s (target 5 s)")
    assert first - ready < 15, f"the joiner took {first - ready:.1f} s from ready to its first part"
