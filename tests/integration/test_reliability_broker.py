"""The broker and the bookkeeping under stress (issue 6, scenarios 1, 8-11).

Redis is a throwaway server of the test's own (AOF on): it is crashed and restarted, its clients'
connections are cut, it is starved of memory; a job is stuck past its deadline and the watchdog ends it.
Each test ends with the nothing-lost check of tests/reliability.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from segq import faults
from segq.db import session_scope
from segq.errors import TransientError
from segq.models import Dataset, Job, Status, utcnow
from tests.helpers import ROOT, write_volume
from tests.redis_server import RedisServer
from tests.reliability import Deployment, assert_nothing_lost, deployment, figure, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (64, 40, 36)  # 3 slabs of 4 windows
SMALL = (40, 36, 32)  # 1 slab


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path) as d:
        yield d


def _scans(tmp_path: Path, *names: str, shape: tuple[int, int, int] = SHAPE) -> Path:
    for i, name in enumerate(names):
        write_volume(tmp_path / "scans" / name, shape, seed=10 + i)
    return tmp_path / "scans"


def test_same_dataset_submitted_twice_at_once(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 1: two `segq submit` of one dataset at the same moment: one dataset, one row per volume.

    Each submit pauses for a second inside its transaction, right after looking the dataset up, so
    without the submission lock both would find none and create it twice.
    """
    scans = _scans(tmp_path, "a.nii.gz", "b.nii.gz", shape=SMALL)
    env = {**dep.env, "SEGQ_FAULTS": "pause_in_submit:seconds=1"}
    cmd = [sys.executable, "-m", "segq.cli", "submit", str(scans), "--out", str(tmp_path / "out"),
           "--model", str(unet_model)]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 1
        assert s.scalar(select(func.count()).select_from(Job)) == 2
    dep.worker("w1")
    dep.wait(120)
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz", "b.nii.gz"})
    figure("1 double submit", f"2 concurrent submits: 1 dataset, {len(rows)} job rows for 2 volumes, 2 outputs")


def test_redis_restart_with_queued_and_running_jobs(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 8: Redis crashes (SIGKILL) and restarts from its AOF while one job runs and two wait."""
    pause = "pause_in_infer_slab:slab=1:times=1:seconds=15"
    dep.arm(pause)
    w1 = dep.worker("w1")
    assert "persists (appendonly yes) and evicts nothing (noeviction)" in w1.read_log()
    scans = _scans(tmp_path, "a.nii.gz", "b.nii.gz", "c.nii.gz")
    dep.submit([scans], tmp_path / "out", unet_model)
    wait_for(lambda: faults.hits(dep.faults_dir, pause), 90, "a slab to be running")
    queued = sum(dep.redis.pending().values())
    down = dep.redis.restart(down_for=2)
    restarted = time.monotonic()
    dep.wait(180)
    recovered = time.monotonic() - restarted
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz", "b.nii.gz", "c.nii.gz"})
    most = max(n for r in rows for n in r.deliveries.values())
    assert most <= 2, [r.deliveries for r in rows]
    figure("8 Redis restart (AOF)", f"{queued} message(s) in Redis at the crash, down {down:.1f} s; all 3 jobs "
           f"done {recovered:.0f} s after the restart; at most {most} deliveries of a slab")


def test_worker_warns_when_the_broker_would_lose_work(tmp_path: Path) -> None:
    """Scenario 8, second half: the start-up check names appendonly off and an evicting policy."""
    from segq.broker import persistence_warnings, warn_if_unsafe

    with RedisServer(tmp_path / "lossy", appendonly=False, policy="allkeys-lru") as lossy:
        problems = persistence_warnings(lossy.url())
        assert len(problems) == 2
        assert "appendonly is off" in problems[0] and "maxmemory-policy is allkeys-lru" in problems[1]
        assert warn_if_unsafe(lossy.url()) is False
    with RedisServer(tmp_path / "safe") as safe:
        assert persistence_warnings(safe.url()) == []


def test_submit_to_redis_at_its_memory_limit(dep: Deployment, unet_model: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Scenario 9: Redis refuses writes (maxmemory, noeviction): submit fails clearly, nothing half-queued."""
    scans = _scans(tmp_path, "a.nii.gz", "b.nii.gz", shape=SMALL)
    out = tmp_path / "out"
    dep.redis.starve()
    result = dep.segq("submit", str(scans), "--out", str(out), "--model", str(unet_model))
    assert result.returncode != 0
    assert "refuses writes" in result.stderr and "memory limit" in result.stderr, result.stderr
    assert "nothing was queued" in result.stderr
    # Past the probe (Redis filling up between the probe and the messages): rows are undone, not left queued.
    import producer.submit

    monkeypatch.setattr(producer.submit, "check_writable", lambda url: None)
    with pytest.raises(TransientError, match="nothing of this submission was queued"):
        dep.submit([scans], out, unet_model)
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0
    assert dep.redis.pending() == {}
    dep.redis.feed()
    monkeypatch.undo()
    dep.submit([scans], out, unet_model)
    dep.worker("w1")
    dep.wait(120)
    assert_nothing_lost(dep, unet_model, done={"a.nii.gz", "b.nii.gz"})
    figure("9 Redis at memory limit", f"submit exited {result.returncode}, 0 rows, 0 messages: "
           f"{result.stderr.strip().splitlines()[-1][:110]!r}")


def test_broker_connection_cut_mid_task(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 10: every client connection is cut while slab 1 runs: the task is cancelled and redelivered
    once; one correct output."""
    pause = "pause_in_infer_slab:slab=1:times=1:seconds=15"
    dep.arm(pause)
    w1 = dep.worker("w1")
    dep.submit([_scans(tmp_path, "a.nii.gz")], tmp_path / "out", unet_model)
    wait_for(lambda: faults.hits(dep.faults_dir, pause), 90, "slab 1 to be running")
    cut = dep.redis.cut_clients()
    started = time.monotonic()
    dep.wait(150)
    recovered = time.monotonic() - started
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
    assert rows[0].deliveries == {0: 1, 1: 2, 2: 1}, rows[0].deliveries
    assert w1.proc is not None and w1.proc.poll() is None
    figure("10 connection cut", f"{cut} connections cut; slab 1 delivered 2 times; done {recovered:.0f} s later")


def _backdate(job_id: str, hours: float) -> None:
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(started_at=utcnow() - timedelta(hours=hours)))


def test_watchdog_fails_a_job_stuck_past_its_deadline(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 11: only a coordinator runs, so the chords never complete. Past SEGQ_JOB_DEADLINE the
    worker's watchdog timer fails one job, `segq watchdog --once` the other; then GPU workers drain the
    stale slabs and nothing is left."""
    coordinator = "coordinator,coordinator.high,coordinator.low"
    dep.env["SEGQ_JOB_DEADLINE"] = "3600"
    coord = dep.worker("coord", queues=coordinator, env={"SEGQ_WATCHDOG_INTERVAL": "1"})
    submitted = dep.submit([_scans(tmp_path, "a.nii.gz", "b.nii.gz")], tmp_path / "out", unet_model)
    first, second = submitted.job_ids

    def running() -> bool:
        return all(r.status == Status.RUNNING.value for r in dep.jobs())

    wait_for(running, 60, "both jobs to be running")
    _backdate(first, 2)
    marked = time.monotonic()
    wait_for(lambda: {r.id: r.status for r in dep.jobs()}[first] == "failed", 30, "the worker's watchdog")
    detected = time.monotonic() - marked
    coord.kill()
    _backdate(second, 1.5)
    result = dep.segq("watchdog", "--once")
    assert result.returncode == 0 and "1 stuck job(s) failed" in result.stdout, result.stdout + result.stderr
    dep.worker("gpu", queues="gpu,gpu.high,gpu.low,finish,finish.high,finish.low,coordinator,coordinator.high,"
                             "coordinator.low")
    rows = assert_nothing_lost(dep, unet_model, done=set())
    for row in rows:
        assert "stuck: running for" in (row.error or "") and "SEGQ_JOB_DEADLINE" in (row.error or ""), row.error
    figure("11 watchdog", f"stuck job failed {detected:.1f} s after passing its deadline (sweep every 1 s); "
           "`segq watchdog --once` failed the other")
