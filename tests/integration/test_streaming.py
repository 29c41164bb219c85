"""Issue 23: a split volume streamed through real workers (a coordinator and a two-process "GPU" worker on the CPU,
a throwaway Redis, SQLite): parts start on their rows while prepare still writes the rest, never before those rows
are written, and the masks equal MONAI's sliding_window_inference; workers killed mid-stream and mid-merge lose
nothing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from segq import faults
from tests.helpers import reference_probability, write_volume
from tests.integration.test_pipeline import assert_matches_reference
from tests.reliability import Deployment, assert_nothing_lost, deployment, figure

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COORDINATOR = "finish.high,finish,finish.low,coordinator.high,coordinator,coordinator.low"
GPU = "gpu.high,gpu,gpu.low"
# ROI 32, overlap 0.5: 64 x 40 x 36 has 12 windows (x starts 0, 16, 32; 4 windows a start).
SHAPE = (64, 40, 36)
SLOW_ROWS = "pause_in_stream_rows:seconds=0.8"  # prepare's every chunk: the parts must wait for the next ones
READS = "pause_in_read_rows:seconds=0"  # records when each part reads, and which rows


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path, SEGQ_STREAM_RATIO="0.5") as d:
        yield d


def _start(dep: Deployment) -> None:
    dep.worker("coord", queues=COORDINATOR)
    dep.worker("gpu1", queues=GPU, concurrency=2)


def _stream_order(dep: Deployment) -> dict[str, tuple[list[tuple[float, int]], list[tuple[float, int, int]]]]:
    """Per job: when each chunk of rows was marked ready (time, rows: taken before the mark is published), and when
    each part read (time, slab, hi: taken after it saw the mark and before it read)."""
    by_job: dict[str, tuple[list[tuple[float, int]], list[tuple[float, int, int]]]] = defaultdict(lambda: ([], []))
    for hit in faults.hits(dep.faults_dir, SLOW_ROWS):
        by_job[hit["job"]][0].append((float(hit["marked"]), int(hit["rows"])))
    for hit in faults.hits(dep.faults_dir, READS):
        by_job[hit["job"]][1].append((float(hit["time"]), int(hit["slab"]), int(hit["hi"])))
    return dict(by_job)


def test_parts_start_on_their_rows_never_before_and_masks_equal_monai(dep: Deployment, unet_model: Path,
                                                                       tmp_path: Path) -> None:
    dep.arm(f"{SLOW_ROWS},{READS}")
    _start(dep)
    scans = {cap: write_volume(tmp_path / f"scans{cap}" / f"v{cap}.nii.gz", SHAPE, seed=cap) for cap in (3, 4, 6)}
    for cap, scan in scans.items():  # three splits: 4, 3 and 2 parts
        dep.submit([scan], tmp_path / f"out{cap}", unet_model, name=f"cap{cap}", max_windows_per_subtask=cap,
                   save_probabilities=True)
    dep.wait(240)
    rows = assert_nothing_lost(dep, unet_model, done={s.name for s in scans.values()})
    for cap, scan in scans.items():
        out = tmp_path / f"out{cap}"
        assert_matches_reference(out / f"v{cap}_prob.nii.gz", out / f"v{cap}_seg.nii.gz",
                                 reference_probability(scan, unet_model))
    order = _stream_order(dep)
    assert {r.id for r in rows} == set(order)
    early = 0
    for job, (ready, reads) in order.items():
        assert len(ready) >= 2 and reads, f"job {job}: streamed in {len(ready)} chunk(s), {len(reads)} read(s)"
        for read_at, slab, hi in reads:
            marked = [at for at, count in ready if count >= hi]
            assert marked and min(marked) <= read_at, f"job {job}: slab {slab} read rows to {hi} before they were there"
        early += sum(1 for read_at, _slab, _hi in reads if read_at < max(at for at, _count in ready))
    assert early >= 3, "parts must start while prepare still writes the input"
    figure("23 streaming", f"{sum(len(r) for _, r in order.values())} part reads, {early} before their input was whole")


@pytest.mark.parametrize("fault", [
    pytest.param("kill_in_stream_rows:times=1", id="prepare-killed-mid-stream"),
    pytest.param("kill_in_read_rows:slab=0:times=1", id="part-killed-mid-stream"),
    pytest.param("kill_in_add_partial:slab=1:times=1", id="part-killed-mid-add"),
    pytest.param("kill_before_merge_rename:times=1", id="merge-killed-before-rename"),
])
def test_a_worker_killed_mid_stream_or_mid_merge_loses_nothing(dep: Deployment, unet_model: Path, tmp_path: Path,
                                                               fault: str) -> None:
    dep.arm(f"{SLOW_ROWS},{fault}")
    _start(dep)
    scan = write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=7)
    dep.submit([scan], tmp_path / "out", unet_model, max_windows_per_subtask=4)
    dep.wait(240)
    assert len(faults.hits(dep.faults_dir, fault)) == 1, f"{fault} never fired"
    rows = assert_nothing_lost(dep, unet_model, done={"a.nii.gz"})
    assert rows[0].attempt == 0, "recovered within its attempt, not redone as a new one"
    if "add_partial" in fault:
        assert "left half-added (slab 1): rebuilding it" in dep.log(), "the half-added sum must be rebuilt"
    figure(f"23 {fault}", f"deliveries {rows[0].deliveries}")
