"""Round two of hostile input and faults (issue 13, scenarios 16-24) with real workers on a throwaway Redis.

What submit can know, submit refuses with one line and nothing queued; what only a worker can meet (a
full output disk, a constant volume, a failing slab) fails that volume alone, and the worker survives.
The pure checks are unit-tested in tests/unit/test_hostile_round2.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import func, select

from segq.db import session_scope
from segq.models import Dataset, Job, Status, Subtask
from tests.helpers import WorkerProcess, write_model, write_volume
from tests.reliability import (
    Deployment,
    assert_mask_matches,
    assert_nothing_lost,
    deployment,
    figure,
    slab_paused_on_w1,
    temp_files,
    wait_drained,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (64, 40, 36)  # at ROI 32, overlap 0.5: 12 windows, 3 slabs of 4
SMALL = (40, 36, 32)


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path) as d:
        yield d


def _counts() -> tuple[int, int]:
    with session_scope() as s:
        return (int(s.scalar(select(func.count()).select_from(Dataset)) or 0),
                int(s.scalar(select(func.count()).select_from(Job)) or 0))


def _refused(dep: Deployment, *args: str) -> str:
    """Run `segq submit ARGS`, which must fail with one line and no traceback; return that line."""
    result = dep.segq("submit", *args)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and mount (root in a namespace)")


def test_submit_refuses_what_it_can_know(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 16: a model file of wrong types, a checkpoint that does not fit, a channel count the model does
    not take, a complex or RGB volume, a symlink loop named like a volume: each refused by submit in one line,
    naming the file, with 0 rows and 0 messages."""
    scans = tmp_path / "scans"
    write_volume(scans / "a.nii.gz", SMALL, seed=1)
    out = str(tmp_path / "out")
    lines = {}
    typo = tmp_path / "typo" / "model.toml"
    typo.parent.mkdir()
    shutil.copy(unet_model.parent / "model.pt", typo.parent / "model.pt")
    typo.write_text(unet_model.read_text().replace("roi_size = 32", 'roi_size = "big"'))
    lines["type"] = _refused(dep, str(scans), "--out", out, "--model", str(typo))
    assert "roi_size = 'big' must be an integer" in lines["type"]
    misfit = tmp_path / "misfit" / "model.toml"
    misfit.parent.mkdir()
    shutil.copy(unet_model.parent / "model.pt", misfit.parent / "model.pt")
    misfit.write_text(unet_model.read_text().replace("out_channels = 2", "out_channels = 3"))
    lines["checkpoint"] = _refused(dep, str(scans), "--out", out, "--model", str(misfit))
    assert "does not fit UNet" in lines["checkpoint"] and "of another shape" in lines["checkpoint"]
    assert len(lines["checkpoint"]) < 600
    odd = tmp_path / "odd"
    write_volume(odd / "two.nii.gz", (*SMALL, 2), seed=2)
    lines["channels"] = _refused(dep, str(odd), "--out", out, "--model", str(unet_model))
    assert "two.nii.gz: the volume has 2 channel(s) but the model takes 1" in lines["channels"]
    (odd / "two.nii.gz").unlink()
    nib.save(nib.Nifti1Image((np.ones(SMALL) * (1 + 2j)).astype(np.complex64), np.eye(4)), str(odd / "c.nii.gz"))
    lines["complex"] = _refused(dep, str(odd), "--out", out, "--model", str(unet_model))
    assert "c.nii.gz: voxels are complex64" in lines["complex"]
    (odd / "c.nii.gz").unlink()
    rgb = np.zeros(SMALL, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(odd / "rgb.nii.gz"))
    lines["rgb"] = _refused(dep, str(odd), "--out", out, "--model", str(unet_model))
    assert "RGB" in lines["rgb"] and "DTypePromotionError" not in lines["rgb"]
    (odd / "rgb.nii.gz").unlink()
    (odd / "x.nii.gz").symlink_to(odd / "x.nii.gz")
    write_volume(odd / "b.nii.gz", SMALL, seed=3)
    lines["loop"] = _refused(dep, str(odd), "--out", out, "--model", str(unet_model))
    assert "x.nii.gz cannot be resolved" in lines["loop"] and "symlink loop" in lines["loop"]
    assert _counts() == (0, 0) and dep.redis.pending() == {}
    figure("16 submit refuses what it can know", f"{len(lines)} refusals, one line each, 0 rows, 0 messages; "
           f"longest {max(len(line) for line in lines.values())} characters")


@needs_mounts
def test_read_only_output_is_refused_at_submit(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 17: an existing output folder on a read-only mount, and a new one under it, are refused before
    anything is queued (before: every volume's inference ran, then every merge failed)."""
    write_volume(tmp_path / "scans" / "a.nii.gz", SMALL, seed=1)
    ro = tmp_path / "ro"
    (ro / "out").mkdir(parents=True)
    segq = [sys.executable, "-m", "segq.cli", "submit", str(tmp_path / "scans"), "--model", str(unet_model), "--out"]
    lines = []
    for out in (ro / "out", ro / "new" / "out"):
        script = f'mount --bind "{ro}" "{ro}" && mount -o remount,ro,bind "{ro}" && exec "$@"'
        result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *segq, str(out)],
                                env={**os.environ, **dep.env}, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"output directory {out} is not writable (Read-only file system)" in result.stderr, result.stderr
        lines.append(result.stderr.strip().splitlines()[-1])
    assert _counts() == (0, 0) and dep.redis.pending() == {}
    figure("17 read-only output", f"2 refusals at submit, 0 rows, 0 messages: {lines[0][-110:]!r}")


def test_output_paths_have_one_owner(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 18: a second dataset writing the same output paths is refused; with --overwrite it takes them
    over and the first dataset's job says so (cancelled, naming the new owner); retry cannot take them back."""
    scans = tmp_path / "scans"
    write_volume(scans / "a.nii.gz", SMALL, seed=1)
    out = tmp_path / "out"
    dep.worker("w1")
    first = dep.segq("submit", str(scans), "--out", str(out), "--model", str(unet_model), "--name", "A",
                     "--wait", "--timeout", "120")
    assert first.returncode == 0, first.stderr[-3000:]
    said = first.stdout + first.stderr
    assert said.count("queued 1 volume(s)") == 1 and said.count("a.nii.gz -> ") == 1, said  # each result once
    other = write_model(tmp_path / "other", "UNet", roi=32, feature_size=4, seed=7)
    line = _refused(dep, str(scans), "--out", str(out), "--model", str(other), "--name", "B")
    assert "1 output(s) already belong to dataset(s)" in line and "--overwrite" in line
    assert _counts() == (1, 1)
    taken = dep.segq("submit", str(scans), "--out", str(out), "--model", str(other), "--name", "B", "--overwrite",
                     "--wait", "--timeout", "120")
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert "takes over 1 output(s)" in taken.stderr
    rows = json.loads(dep.segq("results", "--format", "json").stdout)
    by_dataset = {r["dataset"]: r for r in rows}
    with session_scope() as s:
        ids = {ds.name: ds.id for ds in s.scalars(select(Dataset))}
    a, b = by_dataset[ids["A"]], by_dataset[ids["B"]]
    assert b["status"] == "done" and a["status"] == "cancelled", rows
    assert f"taken over by dataset {ids['B']} 'B'" in a["error"]
    assert a["output"] is None, "results must not show the old dataset owning the mask"
    retried = dep.segq("retry", ids["A"], "--cancelled")
    assert retried.returncode == 0 and "re-queued 0 job(s)" in retried.stdout, retried.stdout + retried.stderr
    assert_mask_matches(out / "a_seg.nii.gz", scans / "a.nii.gz", other)
    assert wait_drained(dep) == {} and not temp_files(out, dep.storage)
    figure("18 output owners", "second dataset refused (0 new rows); with --overwrite it took 1 output over, the "
           "first dataset's job cancelled naming it; retry --cancelled re-queued 0")


def test_cancel_by_a_shared_name_is_refused(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 19: two datasets named alike (different output folders): `segq cancel NAME` refuses and names
    both ids; cancelling by id cancels that dataset alone."""
    write_volume(tmp_path / "scans" / "a.nii.gz", SMALL, seed=1)
    for out in ("out1", "out2"):
        dep.submit([tmp_path / "scans"], tmp_path / out, unet_model, name="night")
    result = dep.segq("cancel", "night")
    assert result.returncode == 1 and "2 datasets are named 'night'" in result.stderr, result.stderr
    with session_scope() as s:
        ids = list(s.scalars(select(Dataset.id).order_by(Dataset.out_dir)))
        assert s.scalar(select(func.count()).select_from(Job).where(Job.status == Status.CANCELLED)) == 0
    assert dep.segq("cancel", ids[0]).stdout.strip() == "cancelled 1 job(s)"
    with session_scope() as s:
        states = dict(s.execute(select(Job.dataset_id, Job.status)).all())
    assert states == {ids[0]: Status.CANCELLED, ids[1]: Status.QUEUED}
    evaluate = dep.segq("evaluate", "night", "--truth", str(tmp_path))
    assert evaluate.returncode == 1 and "2 datasets are named 'night'" in evaluate.stderr
    figure("19 shared name", "cancel and evaluate by the shared name refused, naming both ids; 0 jobs cancelled")


def test_failed_job_leaves_no_subtask_running(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 20: slab 1 of 3 raises; the job fails and none of its subtasks is left running or queued."""
    dep.arm("raise_in_infer_slab:slab=1")
    dep.worker("w1")
    dep.submit([write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1)], tmp_path / "out", unet_model)
    dep.wait(120)
    assert_nothing_lost(dep, unet_model, done=set())
    with session_scope() as s:
        states = [p.status for p in s.scalars(select(Subtask))]
    assert len(states) == 3 and not [st for st in states if not st.final], states
    figure("20 failed job's subtasks", f"subtasks after the failure: {sorted(st.value for st in states)}")


def test_constant_volume_fails_alone_in_the_worker(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 21: an all-zero and a constant volume fail with the reason (before: a 17 mL "tumour"); a good
    volume beside them is done; the worker survives."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for name, value in (("zero.nii.gz", 0.0), ("grey.nii.gz", 100.0)):
        nib.save(nib.Nifti1Image(np.full(SMALL, value, np.float32), np.eye(4)), str(scans / name))
    write_volume(scans / "good.nii.gz", SMALL, seed=3)
    w1 = dep.worker("w1")
    dep.submit([scans], tmp_path / "out", unet_model)
    dep.wait(120)
    rows = {Path(r.input_path).name: r for r in assert_nothing_lost(dep, unet_model, done={"good.nii.gz"})}
    assert "every voxel is 0 (a constant volume)" in (rows["zero.nii.gz"].error or "")
    assert "every voxel is 100 (a constant volume)" in (rows["grey.nii.gz"].error or "")
    assert w1.proc is not None and w1.proc.poll() is None
    figure("21 constant volumes", f"2 failed before inference: {rows['zero.nii.gz'].error!r}")


def _namespaced_worker(dep: Deployment, out: Path, size: str) -> WorkerProcess:
    """A worker that sees ``out`` as a tmpfs of ``size`` (its own mount namespace): a small output disk."""
    script = f'mount -t tmpfs -o size={size} segq-full "{out}" && exec "$@"'
    proc = WorkerProcess(dep.env, "full", dep.root / "full.log", prefix=["unshare", "-m", "sh", "-c", script, "sh"])
    dep.workers.append(proc)
    return proc.start()


def _open_temps(pid: int) -> list[str]:
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return [h for h in held if ".tmp-" in h]


@needs_mounts
def test_full_output_disk_fails_the_volume_and_retry_works_after_freeing(dep: Deployment, unet_model: Path,
                                                                        tmp_path: Path) -> None:
    """Scenario 22: the output disk fills during the merge. The job fails saying the disk is full and what to
    do; no handle to the unlinked temp file stays open (before: each failure, and each retry, kept its space
    until the worker restarted); after space is freed `segq retry --failed` writes the mask."""
    out = tmp_path / "out"
    out.mkdir()
    scan = write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1)
    worker = _namespaced_worker(dep, out, "96k")
    assert worker.proc is not None
    seen = Path(f"/proc/{worker.proc.pid}/root{out}")  # the output folder as the worker sees it
    dep.submit([scan], out, unet_model, save_probabilities=True)  # a 368 kB float map: more than the disk holds
    [row] = dep.wait(120)
    assert row.status == "failed" and "the disk is full" in (row.error or "") and "retry --failed" in (row.error or "")
    [child] = worker.children()
    assert _open_temps(child) == [], "a failed write kept its temp file open"
    assert not [p for p in seen.iterdir()], list(seen.iterdir())
    retried = dep.segq("retry", "--failed")  # before freeing: fails again, still leaks nothing
    assert "re-queued 1 job(s)" in retried.stdout, retried.stderr
    wait_for(lambda: dep.jobs()[0].status == "failed" and dep.jobs()[0].attempt == 1, 120, "the retry to fail")
    assert _open_temps(child) == []
    used = os.statvfs(seen)
    used_kb = (used.f_blocks - used.f_bfree) * used.f_frsize // 1024
    subprocess.run(["nsenter", "-t", str(worker.proc.pid), "-m", "mount", "-o", "remount,size=8m", str(out)],
                   check=True)
    assert "re-queued 1 job(s)" in dep.segq("retry", "--failed").stdout
    wait_for(lambda: dep.jobs()[0].status == "done", 120, "the retry after freeing space")
    assert_mask_matches(seen / "a_seg.nii.gz", scan, unet_model)
    assert sorted(p.name for p in seen.iterdir()) == ["a_prob.nii.gz", "a_seg.nii.gz"]
    assert wait_drained(dep) == {} and not list((dep.storage / "jobs").glob("*"))
    figure("22 full output disk", f"2 failures ('the disk is full'), 0 temp files held open, {used_kb} kB used "
           "on the 96 kB disk after them; done after freeing space and retry --failed")



def _vm_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmSize:"))


def test_volume_past_the_memory_limit_fails_alone(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 23: under `ulimit -v` (as on many clusters) a 512³ volume needs more than the worker has left:
    it fails alone, before a voxel is read, with both figures; the next volume is done by the same process."""
    probe = dep.worker("probe")
    [child] = probe.children()
    idle_kb = _vm_kb(child)
    probe.stop()
    dep.workers.remove(probe)
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((512, 512, 512), np.uint8), np.eye(4)), str(scans / "big.nii.gz"))
    write_volume(scans / "small.nii.gz", SMALL, seed=1)
    limit_kb = idle_kb + 1536 * 1024  # 1.5 GiB above an idle pool process
    script = f'ulimit -v {limit_kb} && exec "$@"'
    limited = WorkerProcess(dep.env, "limited", dep.root / "limited.log", prefix=["sh", "-c", script, "sh"])
    dep.workers.append(limited)
    limited.start()
    [child] = limited.children()
    dep.submit([scans], tmp_path / "out", unet_model)
    dep.wait(180)
    rows = {Path(r.input_path).name: r for r in assert_nothing_lost(dep, unet_model, done={"small.nii.gz"})}
    error = rows["big.nii.gz"].error or ""
    assert "a 512x512x512 volume needs about 1.6 GiB to prepare; this worker has" in error, error
    assert limited.children() == [child] and limited.proc is not None and limited.proc.poll() is None
    figure("23 memory limit", f"ulimit -v {limit_kb // 1024} MiB: {error.split(': ', 1)[1][:120]!r}; the same pool "
           "process then did the next volume")


def test_work_of_a_worker_killed_whole_is_requeued_without_a_user(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 24: with a visibility timeout of 5 minutes, the worker running slab 1 is SIGKILLed whole;
    the surviving worker's pings miss it twice and re-queue the job as a new attempt, which it completes,
    long before the timeout and without `segq resume`."""

    with deployment(tmp_path, SEGQ_VISIBILITY_TIMEOUT="300", SEGQ_DEAD_WORKER_INTERVAL="3") as dep:
        scan = write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1)
        w1 = slab_paused_on_w1(dep, scan, tmp_path / "out", unet_model)
        dep.worker("w2")
        killed = time.monotonic()
        w1.kill()
        [row] = dep.wait(150)
        recovered = time.monotonic() - killed
        assert row.status == "done" and row.attempt == 1, row
        assert_mask_matches(Path(row.output_path), scan, unet_model)
        assert not temp_files(tmp_path / "out", dep.storage) and not list((dep.storage / "jobs").glob("*"))
        assert "stopped answering while running it; re-queued as attempt 1" in dep.log()
        assert recovered < 60, f"re-queued {recovered:.0f} s after the kill"
        with session_scope() as s:
            left = [p.status for p in s.scalars(select(Subtask).where(Subtask.attempt == 0))]
        assert Status.RUNNING not in left, left
    figure("24 worker killed whole", f"job re-queued and done {recovered:.1f} s after the kill (pings every 3 s, "
           "two missed; visibility timeout 300 s)")


def test_a_part_whose_message_was_lost_is_requeued(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 27: a part's message vanishes from Redis, as when a worker is killed between kombu's BRPOP and
    its unacked record (scenario 25's note). The sweep finds the running job waiting on a message that is in
    no queue and not delivered, twice in a row, and re-queues the job as a new attempt, which completes."""
    from segq.deadworkers import _message_id
    from segq.names import GPU_QUEUE, slab_task_id

    with deployment(tmp_path, SEGQ_DEAD_WORKER_INTERVAL="2") as dep:
        dep.worker("coord", queues="finish.high,finish,finish.low,coordinator.high,coordinator,coordinator.low")
        scan = write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1)
        dep.submit([scan], tmp_path / "out", unet_model)
        client = dep.redis.client(0)
        wait_for(lambda: client.llen(GPU_QUEUE) == 3, 60, "the volume's three parts to wait in the gpu queue")
        with session_scope() as s:
            job_id = s.scalars(select(Job.id)).one()
        [raw] = [m for m in client.lrange(GPU_QUEUE, 0, -1) if _message_id(m) == slab_task_id(job_id, 0, 1)]
        assert client.lrem(GPU_QUEUE, 1, raw) == 1  # the message of part 1 is lost
        lost = time.monotonic()
        wait_for(lambda: "re-queued as attempt 1" in dep.log(), 30, "the sweep to re-queue the job")
        found = time.monotonic() - lost
        assert f"the message of {slab_task_id(job_id, 0, 1)} is in no queue and not delivered" in dep.log()
        dep.worker("w1")
        [row] = dep.wait(120)
        assert row.status == "done" and row.attempt == 1, row
        assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
    figure("27 a part's message lost", f"job re-queued {found:.1f} s after the message vanished (sweep every 2 s, "
           "missing twice); attempt 1 done")
