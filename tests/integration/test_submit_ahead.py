"""A volume's prepare starts while `segq submit` still hashes it (issue 23, item 2), with real Redis, a real worker
and SQLite; hashing is made slow through the ``in_input_hash`` fault point.

The order is read from what the run recorded (the timeline and `segq submit --timings`); a file changed under the
early prepare is refused as before, late, with nothing left behind; a submission that cannot record its hash
withdraws what it queued ahead, and nothing is left behind either.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from segq import faults
from segq.db import session_scope
from segq.models import Dataset, Job, Status, Step, Subtask
from segq.modelspec import file_sha256
from tests.conftest import Stack
from tests.helpers import ROOT, WorkerProcess, write_volume
from tests.integration.test_datasets import leftovers, until
from tests.integration.test_pipeline import segq
from tests.reliability import assert_mask_matches

pytestmark = pytest.mark.integration

SHAPE = (40, 36, 32)  # one part
SLOW_HASH = "pause_in_input_hash:seconds=4"


def _faults_env(stack: Stack, tmp_path: Path, spec: str) -> dict[str, str]:
    return {**stack.env, "SEGQ_FAULTS": spec, "SEGQ_FAULTS_DIR": str(tmp_path / "faults")}


def _worker(stack: Stack, tmp_path: Path, spec: str = "") -> WorkerProcess:
    proc = WorkerProcess(_faults_env(stack, tmp_path, spec), "w1", tmp_path / "w1.log")
    stack.workers.append(proc)
    return proc.start()


def _submit(stack: Stack, tmp_path: Path, scan: Path, spec: str, model: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "segq.cli", "submit", str(scan), "--out", str(tmp_path / "out"), "--model",
            str(model), "--name", "urgent", "--timings"]
    return subprocess.Popen(argv, env={**_faults_env(stack, tmp_path, spec)}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _timings(stderr: str) -> dict[str, float]:
    line = next(line for line in stderr.splitlines() if line.startswith("timings "))
    return json.loads(line.removeprefix("timings "))  # type: ignore[no-any-return]


def _job() -> Job:
    with session_scope() as s:
        return s.scalars(select(Job).join(Dataset).where(Dataset.name == "urgent")).one()


def _final(timeout: float = 120) -> Job:
    until(lambda: _job().status.final, timeout, "the job to end")
    return _job()


def _warm_checkpoint(stack: Stack, tmp_path: Path, model: Path) -> None:
    """The first submit of a model checks its checkpoint (torch, seconds); a dataset that ran it spares the others."""
    scan = write_volume(tmp_path / "warm" / "w.nii.gz", SHAPE, seed=7)
    segq("submit", str(scan), "--out", str(tmp_path / "warm-out"), "--model", str(model), "--name", "warm",
         "--wait", "--timeout", "120", env=stack.env)


def test_prepare_starts_before_the_hash_is_recorded(fresh_stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    """One volume, its hash slowed to 4 s: its prepare message goes out and its prepare starts before the hash
    is known; the prepare waits for it at its gate, and the mask is right."""
    _worker(fresh_stack, tmp_path)
    _warm_checkpoint(fresh_stack, tmp_path, unet_model)
    scan = write_volume(tmp_path / "scans" / "ct.nii.gz", SHAPE, seed=1)
    proc = _submit(fresh_stack, tmp_path, scan, SLOW_HASH, unet_model)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "queued 1 volume(s)" in stdout, stdout + stderr
    marks = _timings(stderr)
    assert marks["prepare_sent_s"] < marks["job_row_s"] + 1 < marks["hash_finished_s"], marks
    assert marks["hash_seconds"] >= 4 and marks["imported_s"] < marks["checked_s"] < marks["prepare_sent_s"], marks
    job = _final()
    assert job.status == Status.DONE, job.error
    assert job.input_sha256 == file_sha256(scan)
    with session_scope() as s:
        steps = {st.step: st for st in s.scalars(select(Step).where(Step.job_id == job.id))}
    assert steps["prepare"].started_at < steps["hash"].finished_at - timedelta(seconds=1), steps
    assert steps["hash"].worker.startswith("segq submit@")
    assert_mask_matches(Path(job.output_path), scan, unet_model)
    assert not leftovers(fresh_stack, tmp_path / "out")


def test_a_file_changed_under_the_early_prepare_is_refused_leaving_nothing(fresh_stack: Stack, unet_model: Path,
                                                                            tmp_path: Path) -> None:
    """Submit hashes the file, then (slowly) records it; the worker's prepare, started meanwhile, reads the file
    after it was rewritten: its own hash differs, found at its gate once submit recorded the hash. The job fails
    "changed since it was submitted", as before the early flow, and nothing is left: no part, no output, no
    workspace, no temp file."""
    slow_hash, slow_prepare = "pause_in_input_hash:seconds=8", "pause_in_prepare:seconds=3"
    _worker(fresh_stack, tmp_path, slow_prepare)
    _warm_checkpoint(fresh_stack, tmp_path, unet_model)
    scan = write_volume(tmp_path / "scans" / "ct.nii.gz", SHAPE, seed=1)
    submitted = file_sha256(scan)
    proc = _submit(fresh_stack, tmp_path, scan, slow_hash, unet_model)
    hit = tmp_path / "faults"
    until(lambda: faults.hits(hit, slow_hash) and faults.hits(hit, slow_prepare), 60, "hash done, prepare started")
    write_volume(scan, SHAPE, seed=2)  # rewritten after submit hashed it, before the worker reads it
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "queued 1 volume(s)" in stdout, stdout + stderr
    job = _final()
    assert job.status == Status.FAILED and "changed since it was submitted" in (job.error or ""), job.error
    assert job.input_sha256 == submitted and submitted[:12] in (job.error or "")
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Subtask).where(Subtask.job_id == job.id)) == 0
    assert not Path(job.output_path).exists() and not leftovers(fresh_stack, tmp_path / "out")


def test_a_hash_that_cannot_be_recorded_withdraws_the_early_job(fresh_stack: Stack, unet_model: Path,
                                                                tmp_path: Path) -> None:
    """The hash fails after the prepare message went out and the prepare waits at its gate: submit fails and
    takes its rows back (the job, the new dataset); the prepare stops, and nothing is left behind."""
    worker = _worker(fresh_stack, tmp_path)
    _warm_checkpoint(fresh_stack, tmp_path, unet_model)
    scan = write_volume(tmp_path / "scans" / "ct.nii.gz", SHAPE, seed=1)
    proc = _submit(fresh_stack, tmp_path, scan, "pause_in_input_hash:seconds=4,raise_in_input_hash", unet_model)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "injected fault raise_in_input_hash" in stderr, stdout + stderr
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Dataset).where(Dataset.name == "urgent")) == 0
        assert s.scalar(select(func.count()).select_from(Job).where(Job.input_path == str(scan))) == 0
    until(lambda: _prepares(worker, "succeeded") == 2, 30, "the early prepare to end")  # the warm-up's, this one
    assert _prepares(worker, "received") == 2 and "ERROR" not in worker.read_log()
    assert not (tmp_path / "out" / "ct_seg.nii.gz").exists() and not leftovers(fresh_stack, tmp_path / "out")


def _prepares(worker: WorkerProcess, what: str) -> int:
    return sum(1 for line in worker.read_log().splitlines() if "segq.segment_volume[" in line and what in line)


def test_a_volume_its_late_hash_finds_done_elsewhere_gets_that_mask(fresh_stack: Stack, unet_model: Path,
                                                                    tmp_path: Path) -> None:
    """The same content under a new path, in a new dataset: queued ahead (this model never read that path), its
    hash, known late, names a done twin. Its mask is copied and the job done with its hash in one step, as a new
    volume's would be; its prepare, waiting at its gate, stops: no part runs, nothing is left behind."""
    worker = _worker(fresh_stack, tmp_path)
    first = write_volume(tmp_path / "scans" / "a.nii.gz", SHAPE, seed=1)
    segq("submit", str(first), "--out", str(tmp_path / "out-a"), "--model", str(unet_model), "--name", "first",
         "--wait", "--timeout", "120", env=fresh_stack.env)
    twin = tmp_path / "elsewhere" / "b.nii.gz"
    twin.parent.mkdir()
    shutil.copyfile(first, twin)
    proc = _submit(fresh_stack, tmp_path, twin, SLOW_HASH, unet_model)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "queued 0 volume(s), 1 already done" in stdout, stdout + stderr
    assert "prepare_sent_s" in _timings(stderr), "the twin was not queued ahead of its hash"
    job = _job()
    assert job.status == Status.DONE and job.input_sha256 == file_sha256(first)
    assert Path(job.output_path).read_bytes() == (tmp_path / "out-a" / "a_seg.nii.gz").read_bytes()
    until(lambda: _prepares(worker, "succeeded") == 2, 30, "the early prepare to stop")
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Subtask).where(Subtask.job_id == job.id)) == 0
    assert not leftovers(fresh_stack, tmp_path / "out")
