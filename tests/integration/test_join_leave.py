"""Workers that join and leave mid-dataset (issue 22), and the backlog an autoscaler reads, with real workers.

Each test runs its own deployment (throwaway Redis, SQLite): a coordinator process, GPU-role workers as the
launcher runs them (threads pool, gpu queues only, on the CPU here), and the end check every fault scenario
ends with (``assert_nothing_lost``: every mask equal to MONAI's, nothing left in Redis or storage).
"""

from __future__ import annotations

import os
import re
import signal
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
    """A coordinator (merges first, then prepares), in threads: what is under test is the GPU workers, and on the
    loaded 2-core test machine a prefork coordinator's child twice stalled a prepare past the 24 s time limit."""
    queues = ",".join(consumed_queues(FINISH_QUEUE, PREPARE_QUEUE))
    proc = WorkerProcess(dep.env, name, dep.root / f"{name}-{len(dep.workers)}.log",
                         extra=["-Q", queues, "--pool", "threads"], concurrency=2)
    dep.workers.append(proc)
    return proc.start()


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


@pytest.fixture
def batch1_model(tmp_path: Path) -> Path:
    """The tiny UNet with an ROI batch of 1: a part of 4 windows is 4 batches, so a part can stop between them."""
    from tests.helpers import write_model

    return write_model(tmp_path / "unet-b1", "UNet", roi=32, feature_size=4, sw_batch_size=1)


def _batches_started(dep: Deployment, pid: int) -> int:
    """ROI batches the process ``pid`` has started (each paused batch leaves a hit file)."""
    from segq import faults

    return sum(1 for hit in faults.hits(dep.faults_dir, PAUSE) if str(hit.get("pid")) == str(pid))


def _infer_steps() -> list[tuple[str, int, str]]:
    """(job id, part, worker) of every part run to its end, from the timeline."""
    from sqlalchemy import select

    from segq.db import session_scope
    from segq.models import Step

    with session_scope() as s:
        return [(j, int(p), w) for j, p, w in s.execute(select(Step.job_id, Step.part, Step.worker)
                                                         .where(Step.step == "infer"))]


def _sigterm(proc: WorkerProcess, timeout: float) -> tuple[int, float]:
    """SIGTERM the worker's main process (as a scheduler stops a job); its exit code and seconds to exit."""
    assert proc.proc is not None
    sent = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.proc.wait(timeout)
    return code, time.monotonic() - sent


PAUSE = "pause_in_engine_batch:seconds=1.5"
GRACE = 2.0


def test_sigterm_mid_part_longer_than_the_grace_hands_it_back(dep: Deployment, batch1_model: Path,
                                                               tmp_path: Path) -> None:
    """Issue 22 item 4: a part of 4 batches of 1.5 s, SIGTERM after its first batch with a grace of 2 s: the
    part would end 4.5 s later, so it is handed back at once (its partial never written), the worker takes
    nothing new and is gone within grace + 5 s; a second worker runs it; each part ran to its end once."""
    coordinator(dep)
    gpu1 = gpu_worker(dep, "gpu1", env={"SEGQ_FAULTS": PAUSE, "SEGQ_STOP_GRACE": str(GRACE)})
    dep.submit(_scans(tmp_path / "scans", 1), tmp_path / "out", batch1_model)
    assert gpu1.proc is not None
    wait_for(lambda: _batches_started(dep, gpu1.proc.pid) >= 2, 120, "gpu1 into its first part's second batch")
    code, seconds = _sigterm(gpu1, GRACE + 30)
    log = gpu1.read_log()
    assert code == 0, log[-4000:]
    assert re.search(r"slab \d of job \S+ handed back: ", log), log[-4000:]
    assert not [s for s in _infer_steps() if s[2].startswith("gpu1@")], "gpu1 finished a part it should hand back"
    gpu_worker(dep, "gpu2")
    rows = dep.wait(timeout=180)
    assert_nothing_lost(dep, batch1_model)
    steps = _infer_steps()
    assert sorted((j, p) for j, p, _ in steps) == [(rows[0].id, k) for k in range(PARTS)], "a part ran twice or never"
    assert all(w.startswith("gpu2@") for _, _, w in steps)
    assert max(rows[0].deliveries.values()) == 2, rows[0].deliveries  # handed back once, then run
    figure("leave: SIGTERM mid-part past the grace", f"handed back; gone {seconds:.2f} s after SIGTERM "
           f"(grace {GRACE:.0f} s, bound {GRACE + 5:.0f} s)")
    assert seconds < GRACE + 5, f"gone {seconds:.1f} s after SIGTERM"


def test_sigterm_mid_part_that_ends_within_the_grace_finishes_it(dep: Deployment, batch1_model: Path,
                                                                   tmp_path: Path) -> None:
    """Issue 22 item 4: the same part, SIGTERM after its first batch with a grace of 20 s: the parts the worker
    holds end within it, so they finish there (each run once), nothing new is taken, and the worker is gone
    within grace + 5 s; another worker runs the rest."""
    grace = 20.0
    coordinator(dep)
    gpu1 = gpu_worker(dep, "gpu1", env={"SEGQ_FAULTS": PAUSE, "SEGQ_STOP_GRACE": str(grace)})
    dep.submit(_scans(tmp_path / "scans", 2), tmp_path / "out", batch1_model)
    assert gpu1.proc is not None
    wait_for(lambda: _batches_started(dep, gpu1.proc.pid) >= 2, 120, "gpu1 into its first part's second batch")
    code, seconds = _sigterm(gpu1, grace + 30)
    log = gpu1.read_log()
    assert code == 0 and not re.search(r"handed back: ", log), log[-4000:]
    held = [s for s in _infer_steps() if s[2].startswith("gpu1@")]
    assert len(held) == 2, f"gpu1 held 2 parts (threads pool) and must finish both: {held}"
    assert log.count(" received") == 2, "gpu1 took a message after SIGTERM"
    gpu_worker(dep, "gpu2")
    dep.wait(timeout=180)
    assert_nothing_lost(dep, batch1_model)
    steps = _infer_steps()
    assert len(steps) == len({(j, p) for j, p, _ in steps}) == 2 * PARTS, "a part ran twice or never"
    figure("leave: SIGTERM mid-part within the grace", f"both held parts finished; gone {seconds:.2f} s after "
           f"SIGTERM (grace {grace:.0f} s)")
    assert seconds < grace + 5


def test_sigterm_between_parts_and_max_idle(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Issue 22 item 4: a worker holding no part leaves at once on SIGTERM and out of the GPU count; a launcher's
    worker with --max-idle 3 runs a dataset, then leaves by itself (exit 0), is not restarted, and the launcher
    exits 0."""
    from tests.integration.test_workers_helpers import Launched

    coordinator(dep)
    idle = gpu_worker(dep, "gpu1")
    wait_for(lambda: any(n.startswith("gpu1@") for n in scheduler.gpu_worker_names()), 30, "gpu1's heartbeat")
    code, seconds = _sigterm(idle, 30)
    assert code == 0 and not any(n.startswith("gpu1@") for n in scheduler.gpu_worker_names())
    figure("leave: SIGTERM between parts", f"gone {seconds:.2f} s after SIGTERM, out of the GPU count at once")
    assert seconds < 5 + 20
    launcher = Launched(dep.env, tmp_path / "launcher.log", "--gpus", "none", "--role", "gpu", "-n", "idle",
                        "--max-idle", "3")
    try:
        launcher.start(ready=1)
        dep.submit(_scans(tmp_path / "scans", 2), tmp_path / "out", unet_model)
        dep.wait(timeout=180)
        assert launcher.proc is not None
        exit_code = launcher.proc.wait(60)
    finally:
        launcher.cleanup()
    log = launcher.read_log()
    assert exit_code == 0, log[-4000:]
    assert "no work for 3 s (--max-idle): leaving" in log and "cpu0@idle left on its own" in log, log[-4000:]
    assert "restarted" not in log and "every worker process left on its own" in log
    assert_nothing_lost(dep, unet_model, done={"v00.nii.gz", "v01.nii.gz"})
