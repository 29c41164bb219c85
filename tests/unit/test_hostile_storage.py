"""Round three of faults (issue 24, items 8-10): the parts of the output and storage fixes that need no worker.

The scenarios with real workers are in tests/integration/test_reliability_storage.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from segq.models import Status


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


# --- item 9: a disk that fills part-way through a write ---------------------------------------------------

def test_a_short_write_is_a_full_disk() -> None:
    from segq import storage
    from segq.errors import DiskFullError

    full = r"cannot write /s/p\.npy: the disk is full \(a short write: 204800 items requested and 102368 written"
    path = Path("/s/p.npy")
    with pytest.raises(DiskFullError, match=full + r".*then `segq retry --failed`"), storage.disk_errors(path):
        raise OSError("204800 requested and 102368 written")  # numpy's words, no errno
    with pytest.raises(OSError, match="Input/output error"), storage.disk_errors(Path("/s/p.npy")):
        raise OSError(5, "Input/output error")  # not a disk that is full: stays what it is


SHORT_WRITE_PROBE = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from segq import storage
from segq.errors import DiskFullError
ws = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # 100 kB fit, then no room
partial = np.random.default_rng(0).random((32, 40, 36)).astype(np.float32)  # 184 kB
for write in (storage.save_array_once, storage.save_array):
    try:
        write(ws / "part_0001.npy", partial)
    except DiskFullError as exc:
        print(exc)
print(sorted(p.name for p in ws.iterdir()))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space freed
print(storage.save_array_once(ws / "part_0001.npy", partial))
"""


def test_a_short_write_leaves_no_partial_file_and_the_retry_writes_it(tmp_path: Path) -> None:
    """A real short write (numpy's fwrite under a file-size limit, as on a disk that fills part-way): both writers
    of workspace arrays raise DiskFullError and leave no temp file; once there is room the same write succeeds."""
    import subprocess
    import sys

    import numpy as np

    from tests.helpers import ROOT

    result = subprocess.run([sys.executable, "-c", SHORT_WRITE_PROBE, str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second, left, retried = result.stdout.strip().splitlines()
    for message in (first, second):
        assert "the disk is full (a short write: " in message and "then `segq retry --failed`" in message, message
    assert left == "[]", f"a failed write left {left}"
    assert retried == "True"
    assert np.load(tmp_path / "part_0001.npy").shape == (32, 40, 36)


def test_partials_of_small_parts_need_many_times_the_volume() -> None:
    """The known answer of the estimate: one part is the padded volume; a 512x512x300 CT's 600 windows (ROI 96,
    overlap 0.5) in parts of one window need 112.5 volumes (each part covers 96 rows of 512)."""
    import numpy as np

    from segq.tiling import partial_bytes, plan_windows

    plan = plan_windows((512, 512, 300), (96, 96, 96), 0.5, "gaussian")
    volume = int(np.prod(plan.padded_shape)) * 4
    assert partial_bytes(plan, plan.split(1)) == volume
    assert len(plan.starts) == 600 and partial_bytes(plan, plan.split(600)) == 600 * 96 * 512 * 300 * 4
    assert partial_bytes(plan, plan.split(600), channels=3, itemsize=2) == 600 * 96 * 512 * 300 * 6


def test_a_split_that_does_not_fit_the_storage_is_shrunk_or_refused_with_the_figure() -> None:
    from segq.errors import DiskFullError
    from segq.tiling import partial_bytes, plan_windows
    from worker.jobs import split_to_fit

    plan = plan_windows((64, 40, 36), (32, 32, 32), 0.5, "gaussian")  # 12 windows, 4 along each x start
    volume = 64 * 40 * 36 * 4

    def partials(slabs: list) -> int:
        return partial_bytes(plan, slabs)

    def fit(free: int) -> int:
        return len(split_to_fit(plan, 12, volume, partials, Path("/storage"), "a.nii.gz", free))

    assert fit(10 * volume) == 12  # 12 parts of 32 rows: 6 volumes of partials and the input fit
    assert fit(4 * volume) == 6  # 6 parts (192 rows, 3 volumes) is the most that fits
    assert fit(2 * volume) == 1  # 2 and 3 parts cover 96 rows: only one part fits beside the input
    with pytest.raises(DiskFullError, match="needs about 737 kB"):
        fit(2 * volume - 1)
    with pytest.raises(DiskFullError) as refused:
        fit(volume)
    message = str(refused.value)
    assert message.startswith("a.nii.gz: its workspace needs about 737 kB on /storage (the padded input 369 kB "
                              "and, in one part, its partial 369 kB), and 369 kB is free there"), message
    assert "then `segq retry --failed`" in message


# --- item 10: a worker that cannot see the shared storage ------------------------------------------------

def test_a_storage_that_is_not_the_registered_one_is_named_with_the_fix(tmp_path: Path) -> None:
    from segq import sharedstorage
    from tests.redis_server import RedisServer

    redis = RedisServer(tmp_path / "redis").start()
    try:
        client = redis.client(0)
        shared, other = tmp_path / "shared", tmp_path / "other"
        assert sharedstorage.problem(client, shared, "a@x") is None  # nothing registered: nothing tells
        assert sharedstorage.problem(client, shared, "a@x", start=True) is None  # the first worker registers it
        assert (shared / sharedstorage.MARKER).is_file()
        assert sharedstorage.problem(client, shared, "b@y", start=True) is None  # same storage, another worker
        refused = sharedstorage.problem(client, other, "c@z", start=True)
        assert refused is not None and refused.startswith(f"storage is not shared: SEGQ_STORAGE={other} on worker c@z")
        assert f"it holds no .segq-storage marker; a@x registered {shared}" in refused, refused
        assert refused.endswith("Mount the same filesystem at the same path on every machine, then start this worker "
                                "again")
        assert not other.exists()  # a refused worker writes nothing into the wrong storage
        (shared / sharedstorage.MARKER).unlink()  # the mount dropped: an empty directory under the same path
        assert sharedstorage.problem(client, shared, "a@x") is not None
    finally:
        redis.stop()
