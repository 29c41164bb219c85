"""The scheduler with real workers (issue "Keep every GPU busy"): finish before you start, a bounded
look-ahead, fairness between datasets, a cancel that keeps merged work, the prefetching worker (threads
pool, device lease) against MONAI, and the timeline it records."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from segq.db import session_scope
from segq.models import Dataset, Job, Status, Step
from tests.conftest import Stack
from tests.helpers import WorkerProcess, environment, write_volume
from tests.integration.test_datasets import jobs_of, submit, until
from tests.integration.test_pipeline import assert_matches_reference, reference_probability, segq

pytestmark = pytest.mark.integration

SHAPE = (36, 34, 30)  # ROI 32 at overlap 0.5: 2 x 2 x 1 = 4 windows


def _scans(directory: Path, count: int, seed: int = 0) -> Path:
    for i in range(count):
        write_volume(directory / f"v{i:02d}.nii.gz", SHAPE, seed=seed + i)
    return directory


class WorkspaceWatch:
    """Counts job workspaces under the storage every 20 ms, in a thread, and keeps the largest count."""

    def __init__(self, storage: Path) -> None:
        self.jobs = storage / "jobs"
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                count = sum(1 for p in self.jobs.iterdir() if p.is_dir()) if self.jobs.is_dir() else 0
            except FileNotFoundError:  # a workspace removed while listed
                continue
            self.most = max(self.most, count)
            time.sleep(0.02)

    @contextmanager
    def running(self) -> Iterator[WorkspaceWatch]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(5)


def _statuses(name: str) -> list[Status]:
    return [job.status for job in jobs_of(name)]


@pytest.fixture
def lookahead_stack(fresh_stack: Stack) -> Stack:
    """One worker (one device), look-ahead 1: at most 2 volumes admitted at once."""
    fresh_stack.env.update({"SEGQ_LOOKAHEAD": "1", "SEGQ_ADMIT_INTERVAL": "1"})
    return fresh_stack


def _submit_here(stack: Stack, scans: Path, out: Path, model: Path, name: str) -> None:
    """Submit in this process, as `segq submit` does (the command's start-up would let the first dataset run
    ahead of the second by seconds on a loaded machine)."""
    from producer.scan import collect_inputs
    from producer.submit import submit as submit_dataset
    from segq.pipeline.toml import load_model_spec

    submit_dataset(collect_inputs([scans], out.resolve()), out, load_model_spec(model), name=name)


def test_first_mask_early_bounded_workspaces_and_a_later_dataset_not_starved(
        lookahead_stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    stack = lookahead_stack
    stack.worker("w1")
    first, second = _scans(tmp_path / "a", 12), _scans(tmp_path / "b", 2, seed=50)
    out_a, out_b = tmp_path / "out-a", tmp_path / "out-b"
    with environment({"SEGQ_LOOKAHEAD": "1"}), WorkspaceWatch(Path(stack.env["SEGQ_STORAGE"])).running() as watch:
        _submit_here(stack, first, out_a, unet_model, "first")
        _submit_here(stack, second, out_b, unet_model, "second")
        until(lambda: any(out_a.glob("*_seg.nii.gz")) or any(out_b.glob("*_seg.nii.gz")), 120, "the first mask")
        waiting = (_statuses("first") + _statuses("second")).count(Status.QUEUED)
        assert waiting >= 9, f"the first mask must come while most volumes still wait; {waiting} of 14 queued"
        with session_scope() as s:
            unadmitted = s.scalar(select(Job.id).where(Job.status == Status.QUEUED, Job.admitted_at.is_(None))
                                  .limit(1))
        assert unadmitted is not None, "the waiting volumes wait in SQL, not as prepare messages"
        until(lambda: all(s.final for s in _statuses("first") + _statuses("second")), 300, "both datasets")
    assert 1 <= watch.most <= 2, f"{watch.most} workspaces at once; the look-ahead allows 1 x (1 + 1)"
    admitted = {name: sorted(j.admitted_at for j in jobs_of(name)) for name in ("first", "second")}
    after = sum(1 for t in admitted["first"] if t > admitted["second"][-1])
    # First in, first out would admit all 12 of the first dataset before the second's: fair room shares it.
    assert after >= 6, f"the later dataset waited for {12 - after} of the first's 12 volumes"
    assert all(s == Status.DONE for s in _statuses("first") + _statuses("second"))
    with session_scope() as s:
        steps = list(s.scalars(select(Step)))
    by_kind = {kind: [st for st in steps if st.step == kind] for kind in ("prepare", "infer", "merge")}
    assert len(by_kind["prepare"]) == 14 and len(by_kind["merge"]) == 14 and len(by_kind["infer"]) >= 14
    for step in by_kind["infer"]:
        assert step.busy_started_at is not None and step.busy_finished_at is not None
        assert step.started_at <= step.busy_started_at <= step.busy_finished_at <= step.finished_at
        assert step.device == "cpu" and step.worker.startswith("w1@")


def test_cancel_keeps_every_volume_already_merged(lookahead_stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    stack = lookahead_stack
    # Each volume's GPU part takes at least 1.5 s, so the cancel (a command's start-up) lands before the dataset ends
    # on however fast a machine.
    stack.env["SEGQ_FAULTS"] = "pause_in_infer_slab:seconds=1.5"
    stack.worker("w1")
    scans, out = _scans(tmp_path / "scans", 12), tmp_path / "out"
    submit(stack, scans, out, unet_model, "stop-me")
    until(lambda: _statuses("stop-me").count(Status.DONE) >= 3, 180, "three volumes done")
    cancelled = segq("cancel", "stop-me", env=stack.env)
    jobs = jobs_of("stop-me")
    done = [job for job in jobs if job.status == Status.DONE]
    assert len(done) >= 3 and "cancelled" in cancelled.stdout
    assert all(job.status in (Status.DONE, Status.CANCELLED) for job in jobs), [j.status for j in jobs]
    for job in done:
        assert Path(job.output_path).is_file(), f"{job.output_path}: merged before the cancel, and kept"
    until(lambda: not any((Path(stack.env["SEGQ_STORAGE"]) / "jobs").glob("*")), 60, "workspaces gone")
    still_queued = [job for job in jobs if job.status == Status.CANCELLED and job.admitted_at is None]
    assert still_queued, "most cancelled volumes were never prepared: they cost nothing"


def test_prefetching_worker_matches_monai_and_holds_the_device_one_step_at_a_time(
        fresh_stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    """A device worker as the launcher runs it: threads pool, two tasks at once, one device lease."""
    stack = fresh_stack
    worker = WorkerProcess(stack.env, "dev", tmp_path / "dev.log", extra=["--pool", "threads"], concurrency=2)
    stack.workers.append(worker.start())
    scans, out = _scans(tmp_path / "scans", 4, seed=7), tmp_path / "out"
    submit(stack, scans, out, unet_model, "prefetch", "--save-probabilities", "--max-windows-per-subtask", "2")
    until(lambda: all(s.final for s in _statuses("prefetch")), 240, "the dataset")
    for job in jobs_of("prefetch"):
        assert job.status == Status.DONE, job.error
        output = Path(job.output_path)
        reference = reference_probability(Path(job.input_path), unet_model)
        assert_matches_reference(output.with_name(output.name.replace("_seg", "_prob")), output, reference)
    with session_scope() as s:
        infers = list(s.scalars(select(Step).join(Job).join(Dataset).where(Dataset.name == "prefetch",
                                                                          Step.step == "infer")))
    assert len(infers) == 8, "4 volumes x 2 parts of 2 windows"
    busy = sorted((st.busy_started_at, st.busy_finished_at) for st in infers)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(busy, busy[1:], strict=False)), \
        "two parts held the device at once"
    spans = sorted((st.started_at, st.finished_at) for st in infers)
    overlapping = sum(1 for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False) if nxt < end)
    assert overlapping >= 1, "with two tasks in flight, one part's I/O must overlap another's inference"
