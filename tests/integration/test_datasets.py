"""Overnight datasets with real Redis, real `segq worker` processes and a real database: idempotent
resubmission, retry, resume after a crash of everything, cancel, the out-of-memory path and priorities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from segq import faults
from segq.db import session_scope
from segq.models import Dataset, Job, Status, Subtask
from tests.conftest import Stack
from tests.helpers import ROOT, WorkerProcess, write_model, write_nan_volume, write_volume
from tests.integration.test_pipeline import assert_matches_reference, reference_probability, segq
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration


def jobs_of(name: str) -> list[Job]:
    with session_scope() as s:
        return list(s.scalars(select(Job).join(Dataset).where(Dataset.name == name).order_by(Job.input_path)))


def subtasks_of(name: str) -> list[Subtask]:
    with session_scope() as s:
        return list(s.scalars(select(Subtask).join(Job).join(Dataset).where(Dataset.name == name)))


def until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(poll)


def received(worker: WorkerProcess) -> int:
    return worker.read_log().count("] received")


def leftovers(stack: Stack, out: Path) -> list[Path]:
    """Workspaces and temp files: what a finished or cancelled job must not leave."""
    jobs_root = Path(stack.env["SEGQ_STORAGE"]) / "jobs"
    spaces = [p for p in jobs_root.glob("*") if p.is_dir()] if jobs_root.exists() else []
    return spaces + list(out.rglob(".*tmp*"))


def submit(stack: Stack, scans: Path, out: Path, model: Path, name: str, *extra: str,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    return segq("submit", str(scans), "--out", str(out), "--model", str(model), "--name", name, *extra,
                env=stack.env, check=check)


def test_resubmission_does_no_inference_and_retry_requeues_failed(fresh_stack: Stack, unet_model: Path,
                                                                   tmp_path: Path) -> None:
    stack = fresh_stack
    worker = stack.worker("w1")
    scans = tmp_path / "scans"
    for i in range(2):
        write_volume(scans / f"v{i}.nii.gz", (36, 34, 30), seed=i)
    write_nan_volume(scans / "bad.nii.gz", at=(1, 2, 3))
    out = tmp_path / "masks"
    first = submit(stack, scans, out, unet_model, "night", "--wait", "--timeout", "240", check=False)
    assert first.returncode == 1 and first.stdout.count("done    ") == 2, first.stdout + first.stderr
    parts, tasks = len(subtasks_of("night")), received(worker)
    masks = {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz")}
    assert parts >= 2 and set(masks) == {"v0_seg.nii.gz", "v1_seg.nii.gz"}

    # The same inputs again: the two done volumes cost nothing; the failed one is queued again (and fails again).
    again = submit(stack, scans, out, unet_model, "night", "--wait", "--timeout", "240", check=False)
    assert "queued 1 volume(s), 2 already done (same dataset as before)" in again.stdout, again.stdout
    assert again.stdout.count("done    ") == 2 and str(out / "v0_seg.nii.gz") in again.stdout
    assert len(subtasks_of("night")) == parts
    assert received(worker) == tasks + 1, "only the failed volume's task may have run"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz")} == masks
    with session_scope() as s:
        assert s.scalar(select(Dataset.id).where(Dataset.name == "night")) is not None
        assert len(list(s.scalars(select(Dataset).where(Dataset.name == "night")))) == 1

    # Another output directory: the masks are copied from the done jobs with the same fingerprint.
    copied = tmp_path / "copy"
    third = segq("submit", str(scans / "v0.nii.gz"), str(scans / "v1.nii.gz"), "--out", str(copied), "--model",
                 str(unet_model), "--name", "copy", "--wait", env=stack.env)
    assert "queued 0 volume(s), 2 already done" in third.stdout and third.stdout.count("done    ") == 2
    assert received(worker) == tasks + 1 and len(subtasks_of("copy")) == 0
    for name in masks:
        assert (copied / name).read_bytes() == (out / name).read_bytes()
    rows = json.loads(segq("results", "copy", "--format", "json", env=stack.env).stdout)
    assert [r["status"] for r in rows] == ["done", "done"] and all(r["tumour_voxels"] is not None for r in rows)

    # retry --failed runs the failed job again (a new attempt); its input is still bad, so it fails again.
    retried = segq("retry", "night", "--failed", env=stack.env)
    assert "re-queued 1 job(s)" in retried.stdout
    assert segq("watch", "night", "--timeout", "240", env=stack.env, check=False).returncode == 1
    bad = next(j for j in jobs_of("night") if j.input_path.endswith("bad.nii.gz"))
    assert bad.status == Status.FAILED and bad.attempt == 2 and "NaN" in (bad.error or "")
    assert received(worker) == tasks + 2

    # Fixing the input itself changes its content hash: submitting again queues exactly that volume.
    write_volume(scans / "bad.nii.gz", (30, 30, 30), seed=9)
    fixed = submit(stack, scans, out, unet_model, "night", "--wait", "--timeout", "240")
    assert "queued 1 volume(s), 2 already done" in fixed.stdout
    bad = next(j for j in jobs_of("night") if j.input_path.endswith("bad.nii.gz"))
    assert bad.status == Status.DONE and bad.attempt == 3 and (out / "bad_seg.nii.gz").is_file()
    results = segq("results", "night", "--format", "csv", env=stack.env)
    assert len(results.stdout.splitlines()) == 4
    assert "summary: 3 volumes (3 done, 0 failed, 0 cancelled, 0 unfinished)" in results.stderr
    assert "median" in results.stderr and "windows/s" in results.stderr
    assert not leftovers(stack, out)


def _watch_in_a_terminal(env: dict[str, str], name: str) -> str:
    """Run `segq watch` with a pseudo-terminal as stdout: the live rich display path."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "segq.cli", "watch", name, "--timeout", "60"], cwd=ROOT,
                            env={**os.environ, **env, "COLUMNS": "160", "TERM": "xterm"}, stdout=slave,
                            stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server (own port, AOF on): this test restarts it, which no shared Redis may suffer."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_resume_after_workers_killed_and_redis_restarted(fresh_stack: Stack, own_redis: RedisServer,
                                                         unet_model: Path, tmp_path: Path) -> None:
    stack = fresh_stack
    stack.env["SEGQ_BROKER_URL"] = own_redis.url(0)
    os.environ["SEGQ_BROKER_URL"] = own_redis.url(0)  # fresh_stack restores it afterwards
    from tests.helpers import reset_caches

    reset_caches()
    scans = tmp_path / "scans"
    names = [f"v{i}" for i in range(4)]
    for i, name in enumerate(names):
        write_volume(scans / f"{name}.nii.gz", (48, 40, 36), seed=i)
    out = tmp_path / "masks"
    # The last volume's preparation stalls (once), so the crash always finds volumes done and one not;
    # the second pool process finishes the others meanwhile.
    stack.env["SEGQ_FAULTS"] = f"pause_in_prepare:input={names[-1]}.nii.gz:seconds=300:times=1"
    stack.env["SEGQ_FAULTS_DIR"] = str(tmp_path / "faults")
    worker = stack.worker("w1", concurrency=2)
    submit(stack, scans, out, unet_model, "crash", "--max-windows-per-subtask", "2")

    def some_done_and_one_stalled() -> bool:
        states = [j.status for j in jobs_of("crash")]
        return Status.DONE in states and bool(faults.hits(tmp_path / "faults", stack.env["SEGQ_FAULTS"]))

    # Merges come before new preparations, so the stall may begin after the first volume is done: wait for both.
    until(some_done_and_one_stalled, 240, "a first volume done and the last one's preparation stalled", poll=0.05)
    worker.kill()  # SIGKILL to the whole process group: no warm shutdown, no message given back
    own_redis.restart()
    before = {j.id: j for j in jobs_of("crash")}
    done_before = {i: (j.attempt, j.finished_at) for i, j in before.items() if j.status == Status.DONE}
    unfinished = [i for i, j in before.items() if not j.status.final]
    assert done_before and unfinished, "the crash must leave some volumes done and some not"

    resumed = segq("resume", "crash", env=stack.env)
    assert f"re-queued {len(unfinished)} unfinished job(s)" in resumed.stdout
    stack.worker("w2")
    watched = segq("watch", "crash", "--timeout", "240", env=stack.env)
    assert watched.stdout.count("done    ") == len(names), watched.stdout

    after = {j.id: j for j in jobs_of("crash")}
    assert all(j.status == Status.DONE for j in after.values())
    for job_id, (attempt, finished) in done_before.items():
        assert (after[job_id].attempt, after[job_id].finished_at) == (attempt, finished), "a done volume was redone"
    for job_id in unfinished:
        assert after[job_id].attempt == before[job_id].attempt + 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_seg.nii.gz" for n in names)
    assert not leftovers(stack, out)
    with session_scope() as s:
        for job_id in unfinished:
            current = list(s.scalars(select(Subtask).where(Subtask.job_id == job_id,
                                                           Subtask.attempt == after[job_id].attempt)))
            assert current and all(p.status == Status.DONE for p in current)
    screen = _watch_in_a_terminal(stack.env, "crash")
    assert "done" in screen and "4 done, 0 failed" in screen


def test_cancel_mid_volume_leaves_nothing_behind(fresh_stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    stack = fresh_stack
    # Slab 3 waits, so the volume is still running when two slabs are done, however fast this machine runs the rest.
    stack.env["SEGQ_FAULTS"] = "pause_in_infer_slab:slab=3:times=1:seconds=8"
    worker = stack.worker("w1")
    scans = tmp_path / "scans"
    write_volume(scans / "big.nii.gz", (96, 80, 64), seed=3)
    out = tmp_path / "masks"
    submit(stack, scans, out, unet_model, "cancel-me", "--max-windows-per-subtask", "1")

    def slabs_done() -> int:
        return sum(1 for p in subtasks_of("cancel-me") if p.status == Status.DONE)

    until(lambda: slabs_done() >= 2, 240, "two slabs done", poll=0.05)
    job = jobs_of("cancel-me")[0]
    assert job.status == Status.RUNNING and job.subtasks and job.subtasks > 10
    cancelled = segq("cancel", "cancel-me", env=stack.env)
    assert "cancelled 1 job(s)" in cancelled.stdout

    import redis

    broker = redis.Redis.from_url(stack.env["SEGQ_BROKER_URL"])

    def drained() -> bool:
        return broker.llen("gpu") == 0 and broker.llen("coordinator") == 0 and not leftovers(stack, out)

    until(drained, 120, "queues drained and workspace deleted", poll=0.2)
    time.sleep(2)  # a task still finishing would re-create files: give it the time to do so
    assert not leftovers(stack, out) and not list(out.glob("*"))
    job = jobs_of("cancel-me")[0]
    assert job.status == Status.CANCELLED and job.error == "cancelled by segq cancel"
    parts = subtasks_of("cancel-me")
    assert sum(p.status == Status.DONE for p in parts) < (job.subtasks or 0)
    assert "Discarding revoked task" in worker.read_log(), "queued slabs must be revoked"
    assert "cancelled 0 job(s)" in segq("cancel", "cancel-me", env=stack.env).stdout


def test_out_of_memory_halves_the_roi_batch(fresh_stack: Stack, models_dir: Path, tmp_path: Path) -> None:
    stack = fresh_stack
    model = write_model(models_dir / "unet-b8", "UNet", roi=32, feature_size=4, sw_batch_size=8)
    # 8 -> 4 -> 2 -> 1: three retries, four deliveries of each slab; none of them is a lost worker.
    env = {**stack.env, "SEGQ_FAULTS": "oom_in_engine_batch:above=1"}
    worker = WorkerProcess(env, "oom", tmp_path / "oom.log")
    stack.workers.append(worker)
    worker.start()
    scans = tmp_path / "scans"
    write_volume(scans / "v.nii.gz", (48, 48, 40), seed=5)  # 8 windows: two slabs of 4
    out = tmp_path / "masks"
    submit(stack, scans, out, model, "oom", "--wait", "--timeout", "240", "--save-probabilities")
    job = jobs_of("oom")[0]
    assert job.status == Status.DONE and job.subtasks == 2
    parts = subtasks_of("oom")
    assert [p.batch_size for p in parts] == [1, 1] and all(p.deliveries == 4 for p in parts)
    log = worker.read_log()
    for size in (8, 4, 2):
        assert log.count(f"out of memory at batch {size}, retrying at {size // 2}") == 2, log[-3000:]
    assert_matches_reference(out / "v_prob.nii.gz", out / "v_seg.nii.gz",
                             reference_probability(scans / "v.nii.gz", model))


def test_priorities_order_the_work(fresh_stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    stack = fresh_stack
    for priority, count in (("low", 3), ("high", 2)):
        scans = tmp_path / priority
        for i in range(count):
            write_volume(scans / f"{priority}{i}.nii.gz", (30, 30, 30), seed=i)
        submit(stack, scans, tmp_path / f"out-{priority}", unet_model, priority, "--priority", priority)
    stack.worker("w1", concurrency=1)
    segq("watch", "low", "--timeout", "240", env=stack.env)
    segq("watch", "high", "--timeout", "240", env=stack.env)
    low, high = jobs_of("low"), jobs_of("high")
    assert all(j.status == Status.DONE for j in low + high)
    last_high = max(j.finished_at for j in high if j.finished_at)
    first_low = min(j.started_at for j in low if j.started_at)
    assert last_high < first_low, "high-priority volumes must all finish before any low one starts"
