"""Workers that die, raise or break mid-job (issue 6, scenarios 2-7 and 15).

Each test runs real `segq worker` processes on a throwaway Redis (AOF on), injects one fault with
segq/faults.py or a signal, and ends with the nothing-lost check of tests/reliability.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from segq import faults
from tests.helpers import WorkerProcess, write_volume
from tests.reliability import Deployment, assert_nothing_lost, deployment, figure, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 64 x 40 x 36 at ROI 32, overlap 0.5: 12 windows, 3 slabs of 4.
SHAPE = (64, 40, 36)


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path) as d:
        yield d


def _scan(tmp_path: Path, name: str = "a.nii.gz", seed: int = 1) -> Path:
    return write_volume(tmp_path / "scans" / name, SHAPE, seed=seed)


def _received(log: str, task: str) -> int:
    return sum(1 for line in log.splitlines() if f"Task {task}[" in line and line.rstrip().endswith("received"))


def test_child_killed_during_infer_slab(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 2: SIGKILL of the pool process running slab 1: redelivered, ran twice, job done."""
    pause = "pause_in_infer_slab:slab=1:times=1:seconds=120"
    dep.arm(pause)
    w1 = dep.worker("w1")
    scan = _scan(tmp_path)
    dep.submit([scan], tmp_path / "out", unet_model)
    hit = wait_for(lambda: faults.hits(dep.faults_dir, pause), 90, "slab 1 to start")
    pid = int(hit[0]["pid"])
    assert pid in w1.children()
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    rows = dep.wait(120)
    recovered = time.monotonic() - killed
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
    assert rows[0].deliveries == {0: 1, 1: 2, 2: 1}
    assert w1.proc is not None and w1.proc.poll() is None, "the worker itself must survive"
    figure("2 child SIGKILL", f"slab 1 delivered 2 times; job done {recovered:.1f} s after the kill")


def test_whole_worker_killed_then_new_worker(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 3: SIGKILL of the whole worker mid-slab; a new worker gets the message back after the
    visibility timeout and completes the job."""
    pause = "pause_in_infer_slab:slab=1:times=1:seconds=120"
    dep.arm(pause)
    w1 = dep.worker("w1")
    dep.submit([_scan(tmp_path)], tmp_path / "out", unet_model)
    wait_for(lambda: faults.hits(dep.faults_dir, pause), 90, "slab 1 to start")
    killed = time.monotonic()
    w1.kill()
    dep.worker("w2")
    dep.wait(150)
    recovered = time.monotonic() - killed
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
    assert rows[0].deliveries == {0: 1, 1: 2, 2: 1}
    figure("3 whole worker SIGKILL", f"slab 1 delivered 2 times; job done {recovered:.1f} s after the kill "
           f"(visibility timeout {dep.env['SEGQ_VISIBILITY_TIMEOUT']} s)")


def test_poison_subtask_fails_job_after_bounded_deliveries(dep: Deployment, unet_model: Path,
                                                           tmp_path: Path) -> None:
    """Scenario 4: slab 1 kills its process every time: failed "worker lost N times", queue empty."""
    dep.arm("kill_in_infer_slab:slab=1")
    started = time.monotonic()
    dep.worker("w1")
    dep.submit([_scan(tmp_path)], tmp_path / "out", unet_model)
    rows = dep.wait(180)
    elapsed = time.monotonic() - started
    rows = assert_nothing_lost(dep, unet_model, done=set())
    max_deliveries = 3
    assert f"worker lost {max_deliveries} times" in (rows[0].error or ""), rows[0].error
    assert "slab 1" in (rows[0].error or "")
    assert rows[0].deliveries[1] == max_deliveries + 1
    assert len(faults.hits(dep.faults_dir, "kill_in_infer_slab:slab=1")) == max_deliveries
    figure("4 poison subtask", f"{max_deliveries} kills, delivery {max_deliveries + 1} refused; job failed "
           f"{elapsed:.1f} s after the worker started")


def test_poison_volume_and_poison_merge_are_bounded_too(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 4, the other steps: loading one volume, and merging another, kill their process every time.
    Each is failed after SEGQ_MAX_DELIVERIES ("worker lost N times"), nothing is left, a third job is done."""
    dep.arm("kill_in_prepare:input=a.nii.gz,kill_before_merge_rename:output=b_seg.nii.gz")
    for i, name in enumerate(("a.nii.gz", "b.nii.gz", "c.nii.gz")):
        write_volume(tmp_path / "scans" / name, (40, 36, 32), seed=i)
    dep.worker("w1")
    started = time.monotonic()
    dep.submit([tmp_path / "scans"], tmp_path / "out", unet_model)
    dep.wait(180)
    elapsed = time.monotonic() - started
    rows = {Path(r.input_path).name: r for r in assert_nothing_lost(dep, unet_model, done={"c.nii.gz"})}
    assert "preparing the volume: worker lost 3 times" in (rows["a.nii.gz"].error or ""), rows["a.nii.gz"].error
    assert "merge: worker lost 3 times" in (rows["b.nii.gz"].error or ""), rows["b.nii.gz"].error
    assert len(faults.hits(dep.faults_dir, "kill_in_prepare:input=a.nii.gz")) == 3
    assert _received(dep.log(), "segq.merge") == 4 + 1
    figure("4 poison volume and merge", f"3 kills each, delivery 4 refused; both failed, the third job done, "
           f"in {elapsed:.0f} s")


def test_raising_subtask_fails_job_with_slab_named(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 5: slab 1 raises: the job fails with the error and the slab, never retried, no output."""
    dep.arm("raise_in_infer_slab:slab=1")
    dep.worker("w1")
    dep.submit([_scan(tmp_path)], tmp_path / "out", unet_model)
    rows = dep.wait(120)
    rows = assert_nothing_lost(dep, unet_model, done=set())
    assert "slab 1" in (rows[0].error or "") and "injected fault raise_in_infer_slab" in (rows[0].error or "")
    assert rows[0].deliveries[1] == 1
    assert len(faults.hits(dep.faults_dir, "raise_in_infer_slab:slab=1")) == 1
    figure("5 raising subtask", f"slab 1 delivered once; error: {(rows[0].error or '')[:80]!r}")


def test_merge_killed_between_temp_write_and_rename(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 6: the merge dies with its temp file written: redelivered, one valid output, one row."""
    fault = "kill_before_merge_rename:times=1"
    dep.arm(fault)
    dep.worker("w1")
    started = time.monotonic()
    dep.submit([_scan(tmp_path)], tmp_path / "out", unet_model)
    dep.wait(120)
    elapsed = time.monotonic() - started
    assert len(faults.hits(dep.faults_dir, fault)) == 1
    assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
    merges = _received(dep.log(), "segq.merge")
    assert merges == 2, f"the merge must have been delivered twice, saw {merges}"
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "a_seg.nii.gz"]
    figure("6 merge killed before rename", f"merge delivered {merges} times; job done in {elapsed:.1f} s")


def test_subtask_delivered_twice(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 7: a copy of slab 0's message runs too: the merge runs once, with every slab, mask right."""
    coordinator = "finish,finish.high,finish.low,coordinator,coordinator.high,coordinator.low"
    dep.worker("coord", queues=coordinator)
    dep.submit([_scan(tmp_path)], tmp_path / "out", unet_model)
    client = dep.redis.client()
    wait_for(lambda: client.llen("gpu") == 3, 60, "three slab messages in the gpu queue")
    first = client.lindex("gpu", -1)  # consumed first (BRPOP takes from the right)
    client.linsert("gpu", "BEFORE", first, first)  # the copy is consumed right after the original
    assert client.llen("gpu") == 4
    dep.worker("gpu1", queues="gpu,gpu.high,gpu.low")
    dep.wait(120)
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
    slab = min(rows[0].deliveries, key=lambda k: -rows[0].deliveries[k])
    assert sorted(rows[0].deliveries.values()) == [1, 1, 2], rows[0].deliveries
    merges = _received(dep.log(), "segq.merge")
    assert merges == 1, f"the chord body must run once, it was delivered {merges} times"
    figure("7 subtask delivered twice", f"slab {slab} ran 2 times; merge delivered {merges} time")


def test_cuda_error_ends_the_worker_process(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 15: a CUDA error that leaves the context unusable (simulated): the pool process exits,
    a fresh one takes over, the slab is redelivered and the job completes."""
    fault = "cuda_error_in_infer_slab:slab=1:times=1"
    dep.arm(fault)
    w1 = dep.worker("w1")
    started = time.monotonic()
    dep.submit([_scan(tmp_path)], tmp_path / "out", unet_model)
    dep.wait(150)
    elapsed = time.monotonic() - started
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
    assert rows[0].deliveries == {0: 1, 1: 2, 2: 1}
    broken = int(faults.hits(dep.faults_dir, fault)[0]["pid"])
    assert broken not in w1.children(), "the process with the broken context must be gone"
    assert "engine broken, ending this worker process" in w1.read_log()
    assert w1.proc is not None and w1.proc.poll() is None
    figure("15 CUDA error", f"pool process exited, slab 1 delivered 2 times; job done in {elapsed:.1f} s")


def test_device_worker_killed_mid_prefetch(dep: Deployment, unet_model: Path, tmp_path: Path) -> None:
    """Scenario 25: a GPU worker as the launcher runs it (threads pool, two parts in flight) is killed whole
    while each of its threads is inside a part; both messages come back and a new worker finishes the
    dataset, nothing lost."""
    pause = "pause_in_infer_slab:slab=1:times=2:seconds=120"
    dep.arm(pause)
    device_worker = ["-Q", "gpu.high,gpu,gpu.low", "-P", "threads"]
    dep.worker("coord", queues="finish.high,finish,finish.low,coordinator.high,coordinator,coordinator.low")
    w1 = WorkerProcess({**dep.env}, "dev1", dep.root / "dev1.log", extra=device_worker, concurrency=2).start()
    dep.workers.append(w1)
    dep.submit([_scan(tmp_path), _scan(tmp_path, "b.nii.gz", seed=2)], tmp_path / "out", unet_model)
    # Both threads stalled inside a part (slab 1 of each volume): the worker holds two messages, unacked.
    wait_for(lambda: len(faults.hits(dep.faults_dir, pause)) == 2, 90, "both threads to stall in a part")
    killed = time.monotonic()
    w1.kill()
    w2 = WorkerProcess({**dep.env}, "dev2", dep.root / "dev2.log", extra=device_worker, concurrency=2).start()
    dep.workers.append(w2)
    dep.wait(150)
    recovered = time.monotonic() - killed
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz", "b.nii.gz"})
    assert [row.deliveries[1] for row in rows] == [2, 2], [r.deliveries for r in rows]
    figure("25 device worker killed mid-prefetch", f"both stalled parts delivered again; dataset done "
           f"{recovered:.1f} s after the kill (visibility timeout {dep.env['SEGQ_VISIBILITY_TIMEOUT']} s)")


def test_engine_refused_by_the_accuracy_gate_ends_the_worker_for_good(dep: Deployment, unet_model: Path,
                                                                       tmp_path: Path) -> None:
    """Scenario 26: a device worker whose engine the accuracy gate refuses at load (a PyTorch whose numerics
    broke; injected) writes nothing, hands its part back and exits with EX_CONFIG (78), which the launcher
    does not restart; a worker started as the refusal says (fp32) finishes the dataset, nothing lost."""
    refuse = "refuse_in_gate:times=1"
    dep.arm(refuse)
    device_worker = ["-Q", "gpu.high,gpu,gpu.low", "-P", "threads"]
    mixed = {"SEGQ_PRECISION": "bf16"}  # a mixed mode: its engine is gated against fp32 at load
    dep.worker("coord", queues="finish.high,finish,finish.low,coordinator.high,coordinator,coordinator.low")
    w1 = WorkerProcess({**dep.env, **mixed}, "dev1", dep.root / "dev1.log", extra=device_worker).start()
    dep.workers.append(w1)
    dep.submit([_scan(tmp_path)], tmp_path / "out", unet_model)
    assert w1.proc is not None
    assert w1.proc.wait(90) == 78, w1.read_log()[-3000:]
    assert "engine refused, ending this worker process for good (exit code 78)" in w1.read_log()
    assert not list((tmp_path / "out").glob("*.nii*")), "a refused engine must write nothing"
    assert "Run in fp32 or with SEGQ_TORCH_COMPILE=off" in w1.read_log()
    w2 = WorkerProcess({**dep.env}, "dev2", dep.root / "dev2.log", extra=device_worker).start()
    dep.workers.append(w2)
    dep.wait(150)
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})  # the mask against MONAI's own, in fp32
    figure("26 engine refused by the gate", f"worker exited 78; part delivered again, job done "
           f"(deliveries {rows[0].deliveries})")
