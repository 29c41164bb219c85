"""Round three of faults (issue 24, items 8-10): the parts of the output and storage fixes that need no worker.

The scenarios with real workers are in tests/integration/test_reliability_storage.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from segq.models import Status
from tests.helpers import environment


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[None]:
    url = f"sqlite:///{tmp_path / 'segq.db'}"
    with environment({"SEGQ_DATABASE_URL": url, "SEGQ_DATA_DIR": str(tmp_path / "data")}):
        from segq.db import upgrade

        upgrade(url)
        yield


def _job(status: Status, output: str = "/out/a_seg.nii.gz") -> str:
    from segq.db import session_scope
    from segq.models import Dataset, Job

    with session_scope() as s:
        ds = Dataset(name="d", out_dir="/out", model_path="/m", model_sha256="0" * 64, params={})
        s.add(ds)
        s.flush()
        job = Job(dataset_id=ds.id, input_path=f"/in/{ds.id}.nii.gz", input_sha256="0" * 64, fingerprint="f",
                  output_path=output, status=status)
        s.add(job)
        s.flush()
        return job.id


# --- item 8: a job that ends during its merge keeps no output ---------------------------------------------

def test_outputs_of_a_job_that_ended_belong_to_nobody_unless_it_is_done(sqlite_db: None) -> None:
    from segq import records

    cancelled = _job(Status.CANCELLED)
    assert not records.output_claimed(cancelled, "/out/a_seg.nii.gz")  # its merge's files go
    failed = _job(Status.FAILED)
    assert not records.output_claimed(failed, "/out/a_seg.nii.gz")  # another ended job holds nothing either
    done = _job(Status.DONE, "/out/b_seg.nii.gz")
    assert records.output_claimed(done, "/out/b_seg.nii.gz")  # finished after all (a duplicate merge)
    _job(Status.QUEUED)  # a dataset that took /out/a_seg.nii.gz over (submit --overwrite) and has not run yet
    assert records.output_claimed(cancelled, "/out/a_seg.nii.gz")


def test_a_merge_that_fails_removes_every_output_it_wrote(sqlite_db: None, tmp_path: Path) -> None:
    """The step runner's end of a merge that did not finish its job: the mask, the probability map, the label
    sidecar, the DICOM SEG and their temp files all go; those of another input beside them stay."""
    from segq import storage
    from worker.jobs import outputs_of
    from worker.steps import Step, _drop_outputs

    out = tmp_path / "out"
    out.mkdir()
    mask = out / "a_seg.nii.gz"
    family = outputs_of(mask)
    other = outputs_of(out / "b_seg.nii.gz")
    for path in [*family, *other, storage.temp_name(family[0]), storage.temp_name(family[1])]:
        path.write_bytes(b"x")
    job_id = _job(Status.FAILED, str(mask))
    _drop_outputs(Step("merge", job_id, 0, writes_output=True, output=str(mask)))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in other)
