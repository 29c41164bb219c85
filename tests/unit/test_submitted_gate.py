"""Prepare's gate (worker/submitted.py) against a real SQLite database: it waits for the hash `segq submit` records,
refuses a file whose hash differs or that changed while read, and stops for a job withdrawn meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from segq.errors import CancelledError, InputError
from segq.records import PENDING_SHA256
from tests.helpers import environment


@pytest.fixture
def sqlite_db(sqlite_db: None) -> Iterator[None]:
    """The shared database, with prepare waiting at most 2 s for a hash."""
    with environment({"SEGQ_SUBMIT_HASH_WAIT": "2"}):
        yield


def _pending_job() -> str:
    from segq.db import session_scope
    from segq.models import Dataset, Job

    with session_scope() as s:
        ds = Dataset(name="d", out_dir="/out", model_path="/m", model_sha256="0" * 64, params={})
        s.add(ds)
        s.flush()
        job = Job(dataset_id=ds.id, input_path="/in/ct.nii.gz", input_sha256=PENDING_SHA256,
                  fingerprint=PENDING_SHA256, output_path="/out/ct_seg.nii.gz")
        s.add(job)
        s.flush()
        return job.id


def _record_later(job_id: str, sha256: str, after: float) -> threading.Thread:
    from segq.db import session_scope
    from segq.models import Job

    def record() -> None:
        time.sleep(after)
        with session_scope() as s:
            s.execute(update(Job).where(Job.id == job_id).values(input_sha256=sha256, fingerprint="f"))

    thread = threading.Thread(target=record)
    thread.start()
    return thread


def _gate(job_id: str, sha256: str, files: list[Path], before: object = None) -> None:
    from segq import records
    from segq.settings import get_settings
    from worker.submitted import require_submitted

    view = records.load_job(job_id)
    assert view is not None and view.input_sha256 == PENDING_SHA256
    require_submitted(view, sha256, files, before, get_settings())  # type: ignore[arg-type]


def test_the_gate_waits_for_the_hash_then_passes_the_same_file(sqlite_db: None, tmp_path: Path) -> None:
    job_id = _pending_job()
    recorder = _record_later(job_id, "a" * 64, after=0.4)
    started = time.monotonic()
    _gate(job_id, "a" * 64, [])
    assert time.monotonic() - started >= 0.35, "the gate passed before the hash was recorded"
    recorder.join()


def test_the_gate_refuses_a_file_that_is_not_the_one_hashed(sqlite_db: None) -> None:
    job_id = _pending_job()
    recorder = _record_later(job_id, "a" * 64, after=0.2)
    with pytest.raises(InputError, match="changed since it was submitted"):
        _gate(job_id, "b" * 64, [])
    recorder.join()


def test_the_gate_refuses_a_file_rewritten_while_it_was_read(sqlite_db: None, tmp_path: Path) -> None:
    from worker.submitted import file_state

    scan = tmp_path / "ct.nii.gz"
    scan.write_bytes(b"one")
    before = file_state([scan])
    scan.write_bytes(b"other content")
    with pytest.raises(InputError, match="changed while it was read"):
        _gate(_pending_job(), "a" * 64, [scan], before)


def test_the_gate_stops_for_a_withdrawn_job_and_gives_up_on_a_hash_never_recorded(sqlite_db: None) -> None:
    from segq import records

    job_id = _pending_job()
    threading.Timer(0.2, records.forget_submission, args=(records.load_job(job_id).dataset_id,  # type: ignore[union-attr]
                                                           [job_id], True)).start()
    with pytest.raises(CancelledError, match="withdrawn"):
        _gate(job_id, "a" * 64, [])
    with pytest.raises(InputError, match="did not record its sha256 within 2 s"):
        _gate(_pending_job(), "a" * 64, [])


def test_a_job_whose_hash_is_pending_is_never_marked_done(sqlite_db: None) -> None:
    from segq import records
    from segq.models import Status

    job_id = _pending_job()
    assert not records.finish_job(job_id, 0, tumour_voxels=0, tumour_ml=0.0, merge_seconds=0.0)
    view = records.load_job(job_id)
    assert view is not None and view.status == Status.FAILED
