"""Round three of faults (issue 24, items 8-10): outputs and storage, with real workers on a throwaway Redis.

A job that ends during its merge leaves none of its outputs; a disk that fills part-way through a write is a
full disk, and the job runs once space is freed; a worker that cannot see the shared storage stops taking work
instead of failing other workers' jobs. The pure checks are unit-tested in tests/unit/test_hostile_storage.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segq import faults
from tests.helpers import WorkerProcess, write_volume
from tests.reliability import (
    Deployment,
    assert_mask_matches,
    assert_nothing_lost,
    deployment,
    figure,
    temp_files,
    wait_drained,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = (40, 36, 32)
FAMILY = ("_seg.nii.gz", "_prob.nii.gz", "_seg.json", "_seg.dcm")


def _family(out: Path, stem: str) -> list[str]:
    """The outputs of the input ``stem`` that exist under ``out`` (mask, probabilities, label sidecar, SEG)."""
    return sorted(p.name for p in (out / f"{stem}{suffix}" for suffix in FAMILY) if p.exists())


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True)
    return probe.returncode == 0


CAN_MOUNT = _can_mount()
needs_mounts = pytest.mark.skipif(not CAN_MOUNT, reason="needs `unshare -m` and mount (root in a namespace)")


def _cancel_elsewhere(dep: Deployment, target: str, hidden: list[Path]) -> str:
    """`segq cancel` from a machine that does not mount ``hidden`` (--out, the storage): a namespace of its own
    where each is an empty tmpfs. Only the workers can then remove what the merge wrote."""
    mounts = " && ".join(f'mount -t tmpfs none "{path}"' for path in hidden)
    result = subprocess.run(["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh", sys.executable, "-m",
                             "segq.cli", "cancel", target], env={**os.environ, **dep.env}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


MERGE_PAUSES = [
    pytest.param("before_merge_rename:output=a_seg.nii.gz", "here", id="mask-in-temp"),
    pytest.param("before_merge_rename:output=a_seg.nii.gz", "elsewhere", id="mask-in-temp-cancel-elsewhere",
                 marks=needs_mounts),
    pytest.param("before_merge_finish:output=a_seg.nii.gz", "elsewhere", id="all-written-cancel-elsewhere",
                 marks=needs_mounts),
]


@pytest.mark.parametrize(("point", "where"), MERGE_PAUSES)
def test_cancel_during_merge_leaves_no_output_of_the_job(tmp_path: Path, unet_model: Path, point: str,
                                                          where: str) -> None:
    """Scenario 24.8: a dataset is cancelled while its volume's merge is paused, with the probability map renamed
    into place and the mask under its temp name, or with every output written and the job row not yet done; the
    cancel runs here, or on a machine that does not mount --out (so only the worker can clean up). No output of
    the cancelled job remains; the other dataset's mask and probability map stay. Before: the probability map
    stayed in --out (the cancel deleted the mask's live temp file, the merge then failed on it and removed only
    temp files)."""
    from producer.manage import cancel

    out = tmp_path / "out"
    # The pause must not reach the task's soft time limit, which would end the merge with another error.
    with deployment(tmp_path, SEGQ_TASK_TIME_LIMIT="90", SEGQ_VISIBILITY_TIMEOUT="91") as dep:
        dep.worker("w1")
        kept = write_volume(tmp_path / "kept" / "b.nii.gz", SMALL, seed=2)
        dep.submit([kept], out, unet_model, name="kept", save_probabilities=True)
        wait_for(lambda: [r.status for r in dep.jobs()] == ["done"], 120, "the first dataset to be done")
        pause = f"pause_{point}:times=1:seconds=20"
        dep.arm(pause)
        dep.submit([write_volume(tmp_path / "gone" / "a.nii.gz", SMALL, seed=1)], out, unet_model, name="gone",
                   save_probabilities=True)
        wait_for(lambda: faults.hits(dep.faults_dir, pause), 120, "the merge to pause")
        written = _family(out, "a")
        if where == "here":
            assert len(cancel("gone")) == 1
        else:
            assert "cancelled 1 job(s)" in _cancel_elsewhere(dep, "gone", [out, dep.storage])
        ended = time.monotonic()
        assert wait_drained(dep, 60) == {}, "the paused merge did not end"
        rows = {Path(r.input_path).name: r for r in assert_nothing_lost(dep, unet_model)}
        assert rows["a.nii.gz"].status == "cancelled" and rows["b.nii.gz"].status == "done", rows
        assert _family(out, "a") == [], f"outputs of the cancelled job left: {_family(out, 'a')}"
        assert _family(out, "b") == ["b_prob.nii.gz", "b_seg.nii.gz"]
        assert_mask_matches(out / "b_seg.nii.gz", kept, unet_model)
        removed = dep.log().count("ended during the merge")
        assert "TimeLimitExceeded" not in dep.log()
    figure(f"24.8 cancel during merge ({point.split(':')[0]}, cancel {where})",
           f"in --out at the cancel: {written or 'only temp files'}; after the merge ended "
           f"({time.monotonic() - ended:.1f} s): none of them ({removed} removed by the worker); the other "
           "dataset's 2 files kept")


SHAPE = (64, 40, 36)  # at ROI 32, overlap 0.5: 12 windows; input 369 kB, a part of one x start's windows 184 kB


def _worker_on_small_storage(dep: Deployment, size: str, name: str = "small") -> tuple[WorkerProcess, Path]:
    """A worker whose SEGQ_STORAGE is a tmpfs of ``size`` (its own mount namespace), and that storage as the worker
    sees it (through /proc)."""
    dep.storage.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} segq-storage "{dep.storage}" && exec "$@"'
    proc = WorkerProcess(dep.env, name, dep.root / f"{name}.log", prefix=["unshare", "-m", "sh", "-c", script, "sh"])
    dep.workers.append(proc)
    proc.start()
    assert proc.proc is not None
    return proc, Path(f"/proc/{proc.proc.pid}/root{dep.storage}")


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file, then give back ``leave`` bytes of it: a disk another writer filled."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(chunk)
                handle.flush()
        except OSError:
            pass
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


def _assert_storage_clean(seen: Path) -> None:
    assert not temp_files(seen), f"temp files left in the storage: {temp_files(seen)}"
    jobs = seen / "jobs"
    assert not (list(jobs.rglob("*")) if jobs.exists() else []), f"workspaces left: {list(jobs.rglob('*'))[:10]}"


@needs_mounts
def test_a_disk_that_fills_during_a_partial_write_fails_the_job_and_the_retry_runs_after_freeing(
        tmp_path: Path, unet_model: Path) -> None:
    """Scenario 24.9: the storage (a 2 MB tmpfs) fills while part 0 runs, leaving 64 kB for its 184 kB partial:
    the write is short ("... requested and ... written"). The job fails saying the disk is full and what to do,
    the partial's temp file is gone; a retry before freeing is refused at prepare with the figure; after freeing,
    the retry completes. Before: the short write was a bare OSError, and every retry failed at the same part."""
    with deployment(tmp_path, SEGQ_TASK_TIME_LIMIT="90", SEGQ_VISIBILITY_TIMEOUT="91") as dep:
        pause = "pause_in_infer_slab:slab=0:times=1:seconds=10"
        dep.arm(pause)
        _worker, seen = _worker_on_small_storage(dep, "2m")
        scan = write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1)
        dep.submit([scan], tmp_path / "out", unet_model)
        wait_for(lambda: faults.hits(dep.faults_dir, pause), 120, "part 0 to start")
        filler = _fill(seen, 65536)
        [row] = dep.wait(120)
        assert row.status == "failed", row
        assert "slab 0: cannot write" in (row.error or "") and "the disk is full (a short write: " in (row.error or "")
        assert "then `segq retry --failed`" in (row.error or "")
        assert wait_drained(dep, 60) == {}
        _assert_storage_clean(seen)
        assert "re-queued 1 job(s)" in dep.segq("retry", "--failed").stdout  # before freeing: refused at prepare
        wait_for(lambda: dep.jobs()[0].attempt == 1 and dep.jobs()[0].status == "failed", 120, "the first retry")
        refused = dep.jobs()[0].error or ""
        assert "its workspace needs about 737 kB" in refused and "then `segq retry --failed`" in refused, refused
        filler.unlink()
        retried = time.monotonic()
        assert "re-queued 1 job(s)" in dep.segq("retry", "--failed").stdout
        wait_for(lambda: dep.jobs()[0].status == "done", 120, "the retry after freeing space")
        done = time.monotonic() - retried
        assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
        _assert_storage_clean(seen)
    short = (row.error or "").split(": ", 2)[2]
    figure("24.9 disk full part-way through a partial", f"{short!r}; retry before freeing: "
           f"{refused.split('its workspace ', 1)[1][:140]!r}; done {done:.1f} s after the retry that followed freeing")


@needs_mounts
def test_partials_that_would_not_fit_the_storage_shrink_the_split_or_refuse_with_the_figure(
        tmp_path: Path, unet_model: Path) -> None:
    """Scenario 24.9 (the estimate): with parts of one window (SEGQ_MAX_WINDOWS_PER_SUBTASK=1) a volume's 12
    partials and the running sum several parts keep (worker/accumulator.py) need 2.9 MB beside its input, on a
    1.6 MB storage: prepare cuts it into the 3 parts that fit and the mask is right; a volume whose workspace cannot
    fit even in one part fails at prepare with both figures."""
    with deployment(tmp_path, SEGQ_MAX_WINDOWS_PER_SUBTASK="1") as dep:
        _worker, seen = _worker_on_small_storage(dep, "1600k")
        scans = tmp_path / "scans"
        write_volume(scans / "a.nii.gz", SHAPE, seed=1)
        write_volume(scans / "big.nii.gz", (96, 64, 64), seed=2)
        dep.submit([scans], tmp_path / "out", unet_model)
        dep.wait(180)
        rows = {Path(r.input_path).name: r for r in assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})}
        assert len(rows["a.nii.gz"].deliveries) == 3, rows["a.nii.gz"]
        assert "12 parts would need 2.9 MB of workspace" in dep.log() and "cut into 3 part(s) instead" in dep.log()
        error = rows["big.nii.gz"].error or ""
        assert "its workspace needs about 3.1 MB on" in error and "MB is free there" in error, error
        _assert_storage_clean(seen)
    figure("24.9 space estimate", f"12 one-window parts (2.9 MB beside the input) on a 1.6 MB storage: done in 3 "
           f"parts; the big volume: {error.split('its workspace ', 1)[1][:150]!r}")


def _exits(proc: WorkerProcess, timeout: float) -> int:
    assert proc.proc is not None
    return proc.proc.wait(timeout)


def test_a_worker_without_the_shared_storage_refuses_to_start(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 24.10 (at start): a healthy worker runs six volumes; a second worker whose SEGQ_STORAGE is another
    directory (the mount missing on its machine) is started meanwhile. It exits 78 (EX_CONFIG: the launcher does
    not restart it) with one line naming its storage and the fix, having taken nothing; the healthy worker does
    all six. Before: the second worker took parts and failed all six jobs within 4 s."""
    with deployment(tmp_path) as dep:
        dep.worker("good")
        scans = tmp_path / "scans"
        for k in range(6):
            write_volume(scans / f"v{k}.nii.gz", SMALL, seed=k + 1)
        dep.submit([scans], tmp_path / "out", unet_model)
        bad = WorkerProcess({**dep.env, "SEGQ_STORAGE": str(tmp_path / "not-mounted")}, "bad", tmp_path / "bad.log")
        dep.workers.append(bad)
        with pytest.raises(RuntimeError, match="exited with 78"):
            bad.start()
        errors = [line for line in bad.read_log().splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and errors[0].startswith("Error: storage is not shared: SEGQ_STORAGE="), errors
        assert "Mount the same filesystem at the same path on every machine" in errors[0]
        assert "Traceback" not in bad.read_log()
        dep.wait(240)
        rows = assert_nothing_lost(dep, unet_model, done={f"v{k}.nii.gz" for k in range(6)})
        assert not (tmp_path / "not-mounted" / "jobs").exists()
    figure("24.10 worker without the shared storage, at start", f"exit 78 with {errors[0][:160]!r}...; "
           f"{len(rows)} jobs done by the healthy worker")


@needs_mounts
def test_a_worker_that_loses_the_shared_storage_hands_its_work_back_and_stops(tmp_path: Path,
                                                                            unet_model: Path) -> None:
    """Scenario 24.10 (while running): a worker started on the shared storage loses it (an empty filesystem mounted
    over SEGQ_STORAGE in its namespace, as when a network mount drops); six volumes are submitted and it takes the
    first. It finds its storage is not the registered one, hands the message back, stops consuming and exits 78
    (a prefork worker: the pool process asks its own worker to shut down); a healthy worker then does all six."""
    with deployment(tmp_path) as dep:
        proc = WorkerProcess(dep.env, "lost", dep.root / "lost.log", prefix=["unshare", "-m", "sh", "-c",
                                                                            'exec "$@"', "sh"])
        dep.workers.append(proc)
        proc.start()
        assert proc.proc is not None
        subprocess.run(["nsenter", "-t", str(proc.proc.pid), "-m", "mount", "-t", "tmpfs", "lost", str(dep.storage)],
                       check=True)
        scans = tmp_path / "scans"
        for k in range(6):
            write_volume(scans / f"v{k}.nii.gz", SMALL, seed=k + 1)
        dep.submit([scans], tmp_path / "out", unet_model)
        lost = time.monotonic()
        assert _exits(proc, 120) == 78, proc.read_log()[-3000:]
        stopped = time.monotonic() - lost
        log = proc.read_log()
        assert "handed back, stopping this worker (exit code 78): storage is not shared" in log, log[-3000:]
        assert [r.status for r in dep.jobs()].count("failed") == 0
        dep.worker("good")
        dep.wait(240)
        rows = assert_nothing_lost(dep, unet_model, done={f"v{k}.nii.gz" for k in range(6)})
    figure("24.10 worker that loses the shared storage", f"exited 78 {stopped:.1f} s after the submit, 0 jobs failed; "
           f"{len(rows)} done by the healthy worker")
