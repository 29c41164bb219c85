"""Issue 23: the streamed input (rows in slab order, each chunk marked ready), the merge's running sum (added part by
part, recovered after an add that died) and part sizes that let streamed parts finish together. Pure: no Celery."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segq import storage
from segq.errors import CancelledError, InputError, StreamStalledError
from segq.tiling import part_windows, plan_windows
from tests.helpers import environment
from worker import accumulator, inputrows, jobs, streaming


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A loaded volume as load_volume gives it: float32 (C, X, Y, Z) in NIfTI's memory order, some zeros."""
    rng = np.random.default_rng(seed)
    data = rng.normal(3.0, 2.0, size=shape).astype(np.float32)
    data[data < 1.0] = 0.0
    return np.ascontiguousarray(data.transpose(2, 1, 0))[None].transpose(0, 3, 2, 1)


@pytest.mark.parametrize("shape", [(40, 21, 19), (12, 30, 9)], ids=["tall", "padded"])
@pytest.mark.parametrize("method", ["zscore", "none"])
def test_streamed_input_is_the_whole_input_bit_for_bit(tmp_path: Path, shape: tuple[int, ...], method: str) -> None:
    volume = _volume(shape)
    plan = plan_windows(shape, (16, 16, 16), 0.5, "gaussian")
    slabs = plan.split(3)
    whole = jobs.workspace_input(volume.copy(order="K"), plan, method).transpose(0, 3, 2, 1)
    ws = tmp_path / "ws"
    ws.mkdir()
    write = jobs.streamed_input(ws, (1, *plan.padded_shape), slabs, inputrows.InputRows(volume, plan, method))
    assert streaming.rows_ready(ws) == 0
    write(None)
    assert streaming.rows_ready(ws) == plan.padded_shape[0]
    streamed = jobs.load_input(ws)
    assert streamed.shape == whole.shape and streamed.strides[1:] == whole.strides[1:], "NIfTI's order"
    np.testing.assert_array_equal(streamed, whole)


def test_chunks_end_where_parts_end_so_the_first_part_is_ready_first() -> None:
    plan = plan_windows((70, 40, 36), (32, 32, 32), 0.5, "gaussian")
    slabs = plan.split(4)
    bounds = streaming.chunk_bounds(slabs, plan.padded_shape[0])
    assert bounds == sorted(set(bounds)) and bounds[-1] == plan.padded_shape[0]
    assert bounds[0] == slabs[0].hi and all(s.hi in bounds for s in slabs)


def test_a_prepare_delivered_again_never_moves_the_rows_back(tmp_path: Path) -> None:
    volume = _volume((40, 21, 19))
    plan = plan_windows(volume.shape[1:], (16, 16, 16), 0.5, "gaussian")
    slabs = plan.split(3)
    ws = tmp_path / "ws"
    ws.mkdir()
    rows = inputrows.InputRows(volume, plan, "zscore")
    bounds = streaming.chunk_bounds(slabs, plan.padded_shape[0])
    asked: list[tuple[int, int]] = []

    def recording(view: np.ndarray, a: int, b: int) -> None:
        asked.append((a, b))
        rows(view, a, b)

    path, shape = ws / jobs.INPUT, (1, *reversed(plan.padded_shape))
    streaming.write_rows(ws, path, shape, bounds[:1], recording, nifti_order=True)  # killed after one chunk
    first = storage.load_array(path).copy()
    asked.clear()
    streaming.write_rows(ws, path, shape, bounds, recording, nifti_order=True)  # the prepare delivered again
    assert asked[0][0] == bounds[0], "rows already marked ready are not written again"
    np.testing.assert_array_equal(storage.load_array(path)[..., : bounds[0]], first[..., : bounds[0]])
    whole = jobs.workspace_input(volume.copy(order="K"), plan, "zscore")
    np.testing.assert_array_equal(storage.load_array(path), whole)


def test_a_part_waits_for_its_rows_and_no_longer(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    marks: list[float] = []

    def stream() -> None:
        for rows in (10, 20, 30):
            time.sleep(0.2)
            streaming._mark(ws, rows, 30)
            marks.append(time.monotonic())

    writer = threading.Thread(target=stream)
    writer.start()
    streaming.wait_for_rows(ws, 20, None, stall_seconds=5)
    read_at = time.monotonic()
    writer.join()
    assert marks[1] <= read_at < marks[2] + 0.05


def test_a_wait_ends_with_the_job_or_a_stalled_stream(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    streaming._mark(ws, 5, 30)
    with pytest.raises(CancelledError):
        streaming.wait_for_rows(ws, 20, lambda: True, stall_seconds=5)
    with pytest.raises(StreamStalledError, match="SEGQ_STREAM_STALL_SECONDS"):
        streaming.wait_for_rows(ws, 20, lambda: False, stall_seconds=0.2)


def test_stalled_stream_is_retried_by_the_step_policy() -> None:
    from worker.steps import Outcome, outcome

    assert outcome(StreamStalledError("x")) is Outcome.RETRY


def _partials(tmp_path: Path, count: int = 3) -> tuple[Path, tuple[int, int, int], list[accumulator.Part],
                                                         np.ndarray]:
    rng = np.random.default_rng(3)
    shape = (40, 7, 5)
    ws = tmp_path / "ws"
    ws.mkdir()
    expected = np.zeros(shape, dtype=np.float32)
    parts = []
    for k, (lo, hi) in enumerate([(0, 18), (10, 30), (24, 40)][:count]):
        array = rng.random((hi - lo, *shape[1:]), dtype=np.float32)
        storage.save_array(ws / jobs.slab_file(k), array)
        expected[lo:hi] += array
        parts.append(accumulator.Part(k, lo, storage.array_checksum(array), jobs.slab_file(k)))
    return ws, shape, parts, expected


def test_the_running_sum_adds_each_partial_once_in_any_order(tmp_path: Path) -> None:
    ws, shape, parts, expected = _partials(tmp_path)
    for part in (parts[2], parts[0], parts[2], parts[1], parts[0]):  # redeliveries add nothing
        accumulator.add(ws, shape, part)
    np.testing.assert_allclose(accumulator.total(ws, shape, parts), expected, rtol=1e-6)


def test_merge_adds_what_no_part_added(tmp_path: Path) -> None:
    ws, shape, parts, expected = _partials(tmp_path)
    accumulator.add(ws, shape, parts[1])
    np.testing.assert_allclose(accumulator.total(ws, shape, parts), expected, rtol=1e-6)


def test_an_add_that_died_half_way_is_rebuilt_from_the_partials(tmp_path: Path) -> None:
    ws, shape, parts, expected = _partials(tmp_path)
    accumulator.add(ws, shape, parts[0])
    faults = tmp_path / "faults"
    armed = {"SEGQ_FAULTS": "raise_in_add_partial:slab=1", "SEGQ_FAULTS_DIR": str(faults)}
    with environment(armed), pytest.raises(RuntimeError, match="injected"):
        accumulator.add(ws, shape, parts[1])  # as a kill would leave it: half of slab 1 in the sum
    assert json.loads((ws / accumulator.JOURNAL).read_text())["adding"] == 1
    accumulator.add(ws, shape, parts[2])
    np.testing.assert_allclose(accumulator.total(ws, shape, parts), expected, rtol=1e-6)


def test_a_partial_that_is_not_what_its_part_reported_is_refused(tmp_path: Path) -> None:
    ws, shape, parts, _expected = _partials(tmp_path)
    wrong = accumulator.Part(0, 0, "00000000", parts[0].file)
    with pytest.raises(InputError, match="checksum"):
        accumulator.add(ws, shape, wrong)
    accumulator.add(ws, shape, parts[0])
    with pytest.raises(InputError, match="checksum"):
        accumulator.total(ws, shape, [wrong])


def test_merge_of_a_streamed_volume_reads_the_running_sum(tmp_path: Path) -> None:
    ws, shape, parts, expected = _partials(tmp_path)
    plan = plan_windows(shape, (16, 7, 5), 0.5, "constant")
    (ws / jobs.PLAN).write_text(json.dumps({"plan": plan.to_json(), "slabs": [], "accumulate": True}))
    refs = [{"slab": p.index, "lo": p.lo, "checksum": p.checksum, "divided": True} for p in parts]
    for ref in refs[:2]:
        jobs.add_to_sum(ws, ref)
    slabs = [jobs.Slab(p.index, [], p.lo, p.lo + 1) for p in parts]
    source = nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))
    mask = jobs._decide(ws, plan, slabs, {r["slab"]: r for r in refs}, None, source, tmp_path / "m.nii.gz", False)
    np.testing.assert_array_equal(mask, (expected >= 0.5).astype(np.uint8))


@pytest.mark.parametrize("windows, parts, ratio, cap", [(600, 4, 0.0, None), (600, 4, 0.15, None), (601, 3, 0.3, 400),
                                                         (10, 4, 1.0, None), (17, 3, 0.5, 6), (3, 5, 0.2, None)])
def test_part_sizes_cover_every_window_and_finish_together(windows: int, parts: int, ratio: float,
                                                           cap: int | None) -> None:
    counts = part_windows(windows, parts, ratio, cap)
    assert sum(counts) == windows and min(counts) >= 1 and len(counts) == min(parts, windows)
    assert cap is None or max(counts) <= cap
    assert counts == sorted(counts, reverse=True), "later parts' rows come later: they are never larger"
    if ratio == 0:
        assert max(counts) - min(counts) <= 1, "no stream lag: equal parts, the baseline"
    elif cap is None and windows >= 100:
        finish = [ratio * sum(counts[: k + 1]) + n for k, n in enumerate(counts)]
        assert max(finish) - min(finish) <= 1 + ratio, f"parts finish apart: {finish}"


def test_part_sizes_refuse_what_cannot_fit() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        part_windows(100, 2, 0.0, cap=40)
    with pytest.raises(ValueError):
        part_windows(0, 2)


def test_a_plan_split_by_sizes_keeps_slab_order() -> None:
    plan = plan_windows((120, 40, 36), (32, 32, 32), 0.5, "gaussian")
    sizes = part_windows(len(plan.starts), 3, 0.4)
    slabs = plan.split(3, sizes)
    assert [len(s.starts) for s in slabs] == sizes
    assert [s.lo for s in slabs] == sorted(s.lo for s in slabs)
    assert sorted(w for s in slabs for w in s.starts) == sorted(plan.starts)
    assert jobs.cut(plan, 3, 0.4) == slabs and jobs.cut(plan, 3) == plan.split(3)


def test_a_stream_stops_when_its_job_ends(tmp_path: Path) -> None:
    volume = _volume((40, 21, 19))
    plan = plan_windows(volume.shape[1:], (16, 16, 16), 0.5, "gaussian")
    ws = tmp_path / "ws"
    ws.mkdir()
    write = jobs.streamed_input(ws, (1, *plan.padded_shape), plan.split(3), inputrows.InputRows(volume, plan, "none"))
    with pytest.raises(CancelledError, match="while its input was streamed"):
        write(lambda: True)
    assert streaming.rows_ready(ws) == 0


@pytest.mark.parametrize("threads, threaded", [("4", True), ("1", True), ("4", False)],
                         ids=["igzip threads", "one thread", "no igzip_threaded"])
def test_the_mask_deflates_in_threads_or_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: str,
                                                    threaded: bool) -> None:
    import gzip
    import sys

    import isal

    if not threaded:  # an isal older than 1.6: the import fails
        monkeypatch.setitem(sys.modules, "isal.igzip_threaded", None)
        monkeypatch.delattr(isal, "igzip_threaded", raising=False)
    data = np.random.default_rng(1).integers(0, 2, size=1 << 20, dtype=np.uint8).tobytes()
    with environment({"SEGQ_GZIP_THREADS": threads}), open(tmp_path / "m.gz", "wb") as raw, \
            jobs.gzip_stream(raw) as stream:
        stream.write(data)
    assert gzip.decompress((tmp_path / "m.gz").read_bytes()) == data


def test_a_chunk_is_msynced_only_where_another_machine_reads_the_storage(tmp_path: Path) -> None:
    mounts = "/dev/vda / ext4 rw 0 0\nserver:/export /mnt/shared nfs4 rw 0 0\nfs /mnt/shared/local xfs rw 0 0\n"
    assert storage.filesystem_type("/mnt/shared/jobs/a", mounts) == "nfs4"
    assert storage.filesystem_type("/mnt/shared/local/jobs", mounts) == "xfs"
    assert storage.filesystem_type("/mnt/sharedx", mounts) == "ext4"
    assert storage.on_network_filesystem(tmp_path / "not" / "yet") in (True, False)
