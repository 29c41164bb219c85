"""Round three of faults (issue 24): restarts. A worker restarted under its old name, and a Redis restarted empty.

Real workers on a throwaway Redis, real SQLite; every test ends with ``assert_nothing_lost`` (every mask equal
to MONAI's, nothing left in Redis or on disk). Figures for docs/RELIABILITY.md go through ``figure``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from segq.db import session_scope
from segq.models import Job, Status, Subtask
from segq.names import GPU_QUEUE, PREPARE_QUEUE, consumed_queues
from tests.helpers import write_volume
from tests.integration.test_workers_helpers import Launched
from tests.reliability import PASSWORD, assert_nothing_lost, deployment, figure, slab_paused_on_w1, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (64, 40, 36)  # at ROI 32, overlap 0.5: 12 windows, 3 parts of 4
GPU_QUEUES = ",".join(consumed_queues(GPU_QUEUE))


def _attempts() -> dict[str, int]:
    with session_scope() as s:
        return {Path(path).name: attempt for path, attempt in s.execute(select(Job.input_path, Job.attempt))}


def _left_running(attempt: int) -> list[Status]:
    with session_scope() as s:
        return [p.status for p in s.scalars(select(Subtask).where(Subtask.attempt == attempt))
                if p.status == Status.RUNNING]


def test_a_worker_restarted_under_its_old_name_takes_its_work_back(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 29: the only worker, w1, is SIGKILLed whole while it runs slab 1, and started again at once under
    the same name (as systemd or a StatefulSet do). The new start answers every ping as w1, so the pings alone
    would never find the dead process; the new start sees that slab 1 was run by an earlier start of its name
    and re-queues the job as a new attempt, which it completes, long before the visibility timeout."""

    settings = {"SEGQ_VISIBILITY_TIMEOUT": "300", "SEGQ_DEAD_WORKER_INTERVAL": "3"}
    with deployment(tmp_path, **settings) as dep:
        w1 = slab_paused_on_w1(dep, write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1), tmp_path / "out",
                               unet_model)
        killed = time.monotonic()
        w1.kill()
        dep.worker("w1")  # the same name, a new process
        requeued = "was started again (its earlier process, which ran it, is gone); re-queued as attempt 1"
        wait_for(lambda: requeued in dep.log(), 120, "the new start to take slab 1's job back")
        taken = time.monotonic() - killed
        [row] = dep.wait(150)
        recovered = time.monotonic() - killed
        assert row.status == "done" and row.attempt == 1, row
        assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
        assert not _left_running(0)
    figure("29 worker restarted under its old name", f"job re-queued {taken:.1f} s and done {recovered:.1f} s after "
           "the kill, the restart included (visibility timeout 300 s)")


def test_the_launcher_hands_back_the_work_of_a_child_that_died(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 29b: `segq worker --gpus none` runs cpu0 and a coordinator; cpu0 is SIGKILLed (its whole process
    group) while it runs slab 1. The launcher sees the child die, re-queues its job as a new attempt at once, and
    restarts cpu0 under its name; the new attempt completes, long before the visibility timeout."""
    from segq import faults

    settings = {"SEGQ_VISIBILITY_TIMEOUT": "300", "SEGQ_DEAD_WORKER_INTERVAL": "0"}  # no sweep: the launcher alone
    with deployment(tmp_path, **settings) as dep:
        pause = "pause_in_infer_slab:slab=1:times=1:seconds=120"
        dep.arm(pause)
        launcher = Launched(dep.env, tmp_path / "launcher.log", "--gpus", "none", "-n", "box")
        try:
            launcher.start(ready=2)
            scan = write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1)
            dep.submit([scan], tmp_path / "out", unet_model)
            wait_for(lambda: faults.hits(dep.faults_dir, pause), 90, "slab 1 to start")
            child = launcher.children()["cpu0@box"]
            killed = time.monotonic()
            os.killpg(child, signal.SIGKILL)
            handed = "worker cpu0@box died while running it (exit code -9); re-queued as attempt 1"
            launcher.wait_for(handed, timeout=60)
            taken = time.monotonic() - killed
            [row] = dep.wait(150)
            recovered = time.monotonic() - killed
            assert row.status == "done" and row.attempt == 1, row
            assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})  # the killed attempt's message dropped too
        finally:
            launcher.cleanup()
        assert not _left_running(0)
        assert PASSWORD not in launcher.read_log()
    figure("29b launcher's child killed", f"job re-queued {taken:.1f} s after the kill, done {recovered:.1f} s after "
           "it (visibility timeout 300 s, no dead-worker sweep)")


def test_two_live_workers_under_one_name_do_not_take_each_others_work(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 29c: two plain workers started under one name (both `-n dup@%h`, a mistake Celery warns about).
    The second finds the name answering and records no start token, so neither sweep mistakes the other's
    running parts for a dead start's: the job completes in its first attempt."""
    with deployment(tmp_path, SEGQ_DEAD_WORKER_INTERVAL="2") as dep:
        dep.arm("pause_in_infer_slab:seconds=4")  # every part runs across two sweeps
        dep.worker("dup")
        dep.worker("dup")
        assert "another worker is running under the name dup@" in dep.log()
        scan = write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1)
        dep.submit([scan], tmp_path / "out", unet_model)
        [row] = dep.wait(150)
        assert row.status == "done" and row.attempt == 0, row
        assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
        assert "re-queued" not in dep.log()


def test_admitted_jobs_come_back_after_redis_restarted_empty(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 28: Redis without persistence is restarted while two volumes, admitted, wait in the coordinator
    queue (no coordinator has taken them yet) and a third waits in SQL. Redis comes back empty. The GPU worker's
    sweep finds that Redis holds none of the messages the jobs wait on, says so, and re-queues both as new
    attempts; a coordinator started after the restart prepares them; all three complete with no `segq resume`."""
    settings = {"SEGQ_DEAD_WORKER_INTERVAL": "2", "SEGQ_LOOKAHEAD": "1", "SEGQ_ADMIT_INTERVAL": "2",
                "SEGQ_VISIBILITY_TIMEOUT": "300"}  # far beyond the test: only the sweep can bring the work back
    with deployment(tmp_path, appendonly=False, **settings) as dep:
        dep.worker("g", queues=GPU_QUEUES)  # one GPU worker: a window of 2 volumes (look-ahead 1)
        scans = [write_volume(tmp_path / "scans" / f"{n}.nii.gz", SHAPE, seed=i) for i, n in enumerate("abc")]
        dep.submit([tmp_path / "scans"], tmp_path / "out", unet_model)
        client = dep.redis.client(0)
        assert client.llen(PREPARE_QUEUE) == 2, "a and b, admitted, must wait in the coordinator queue"
        dep.redis.restart()
        restarted = time.monotonic()
        assert not dep.redis.pending(), "the restarted Redis must be empty"
        dep.worker("coord", queues=",".join(consumed_queues("finish", PREPARE_QUEUE)))
        seen = "Redis holds none of the 2 messages that admitted and running jobs wait on"
        wait_for(lambda: seen in dep.log(), 90, "the sweep to see the messages gone")
        requeued = time.monotonic() - restarted
        dep.wait(240)
        done = time.monotonic() - restarted
        assert_nothing_lost(dep, unet_model, done={s.name for s in scans})
        attempts = _attempts()
        assert attempts["a.nii.gz"] == 1 and attempts["b.nii.gz"] == 1 and attempts["c.nii.gz"] == 0, attempts
        assert "killed while fetching it" not in dep.log()
    figure("28 Redis restarted empty", f"2 admitted jobs' messages gone; re-queued {requeued:.1f} s after the restart "
           f"(sweep every 2 s, missing twice); all 3 done {done:.1f} s after it")
