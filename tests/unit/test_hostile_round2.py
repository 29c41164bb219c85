"""Round two of hostile input (issue 13): what submit can know, it checks; the fixes that need no worker.

The worker-side scenarios of the same issue are in tests/integration/test_reliability_round2.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from producer.scan import collect_inputs
from producer.watch import JobSample, summarize
from segq.errors import InputError
from segq.models import Status
from segq.pipeline.toml import load_model_spec, write_model_toml
from segq.volumes import load_volume, read_header
from tests.helpers import ROOT, write_model, write_volume
from worker.engines.model import build_checked


def _one_line(message: str, limit: int = 400) -> None:
    assert "\n" not in message and len(message) < limit, message
    assert "Traceback" not in message


# --- item 2: the output directory inside the input directory ------------------------------------------------

def test_masks_inside_the_input_directory_are_never_inputs(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    write_volume(scans / "x.nii.gz", (4, 4, 4))
    write_volume(scans / "masks" / "x_seg.nii.gz", (4, 4, 4))  # what the last submission wrote
    write_volume(scans / "masks" / "masks" / "x_seg_seg.nii.gz", (4, 4, 4))
    found = collect_inputs([scans], (scans / "masks").resolve())
    assert [item.path.name for item in found] == ["x.nii.gz"]
    assert found[0].output == (scans / "masks" / "x_seg.nii.gz").resolve()


def test_output_directory_equal_to_the_input_directory_is_refused(tmp_path: Path) -> None:
    write_volume(tmp_path / "scans" / "x.nii.gz", (4, 4, 4))
    with pytest.raises(InputError, match="is the input directory") as info:
        collect_inputs([tmp_path / "scans"], (tmp_path / "scans").resolve())
    _one_line(str(info.value))


# --- item 6: a symlink loop named like a volume -------------------------------------------------------------

def test_symlink_loop_named_like_a_volume_is_refused_in_one_line(tmp_path: Path) -> None:
    write_volume(tmp_path / "scans" / "a.nii.gz", (4, 4, 4))
    (tmp_path / "scans" / "x.nii.gz").symlink_to(tmp_path / "scans" / "x.nii.gz")
    with pytest.raises(InputError, match="x.nii.gz cannot be resolved .*symlink loop") as info:
        collect_inputs([tmp_path / "scans"], (tmp_path / "out").resolve())
    _one_line(str(info.value))


# --- item 5: model.toml types and the checkpoint's fit ------------------------------------------------------

BASE = {"arch": '"UNet"', "in_channels": "1", "out_channels": "2", "feature_size": "4", "roi_size": "32",
        "target_class": "1", "checkpoint": '"w.pt"'}


def _toml(tmp_path: Path, **changes: str) -> Path:
    (tmp_path / "w.pt").write_bytes(b"weights")
    path = tmp_path / "model.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in {**BASE, **changes}.items()))
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"roi_size": '"big"'}, "roi_size = 'big' must be an integer"),
    ({"overlap": '"0.5"'}, "overlap = '0.5' must be a number"),
    ({"roi_size": "32.5"}, "roi_size = 32.5 must be an integer"),
    ({"roi_size": "true"}, "roi_size = True must be an integer"),
    ({"in_channels": '"1"'}, "in_channels = '1' must be an integer"),
    ({"overlap": "true"}, "overlap = True must be a number"),
    ({"arch": "3"}, "arch = 3 must be a string"),
    ({"checkpoint": "7"}, "checkpoint = 7 must be a string"),
])
def test_model_file_values_are_type_checked(tmp_path: Path, changes: dict[str, str], message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_model_spec(_toml(tmp_path, **changes))
    _one_line(str(info.value))


def test_integer_overlap_is_taken_as_a_number(tmp_path: Path) -> None:
    assert load_model_spec(_toml(tmp_path, overlap="0")).overlap == 0.0


def _refit(tmp_path: Path, source: Path, **fields: object) -> Path:
    """A model file in its own folder with ``fields`` changed, pointing at ``source``'s checkpoint."""
    from dataclasses import replace

    spec = replace(load_model_spec(source), **fields)  # type: ignore[arg-type]
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_model_toml(tmp_path / "model.toml", spec)
    return tmp_path / "model.toml"


@pytest.mark.parametrize(("fields", "message"), [
    ({"out_channels": 3}, r"\d+ weight\(s\) of another shape \(e.g. \S+: checkpoint \[8, 2, .*network \[8, 3,"),
    ({"feature_size": 8}, r"weight\(s\) of another shape"),
    ({"arch": "SegResNet", "feature_size": 8}, r"weight\(s\) missing .*weight\(s\) unexpected"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path: Path, fields: dict[str, object],
                                                               message: str) -> None:
    model = write_model(tmp_path / "unet", "UNet", roi=32, feature_size=4)
    build_checked(load_model_spec(model))  # the checkpoint fits its own file
    with pytest.raises(InputError, match="does not fit") as info:
        build_checked(load_model_spec(_refit(tmp_path / "bad", model, **fields)))
    assert re.search(message, str(info.value)), str(info.value)
    _one_line(str(info.value), 600)


def test_a_network_that_cannot_be_built_is_refused_in_one_line(tmp_path: Path) -> None:
    """SegResNet's GroupNorm needs init_filters divisible by its 8 groups: feature_size 4 cannot be built."""
    model = write_model(tmp_path / "unet", "UNet", roi=32, feature_size=4)
    with pytest.raises(InputError, match="SegResNet cannot be built with these settings") as info:
        build_checked(load_model_spec(_refit(tmp_path / "bad", model, arch="SegResNet", feature_size=4)))
    _one_line(str(info.value))


# --- items 10 and 11: channels, dtypes and constant volumes -------------------------------------------------

def _save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def test_complex_and_rgb_volumes_are_refused_from_the_header(tmp_path: Path) -> None:
    complex_path = _save(tmp_path / "c.nii.gz", (np.ones((4, 4, 4)) + 1j).astype(np.complex64))
    with pytest.raises(InputError, match="complex64 .*segment only the real part"):
        read_header(complex_path, 1 << 30)
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb_path = _save(tmp_path / "rgb.nii.gz", rgb)
    with pytest.raises(InputError, match="RGB or another record type") as info:
        read_header(rgb_path, 1 << 30)
    _one_line(str(info.value))


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_a_constant_volume_fails_with_the_reason(tmp_path: Path, value: float) -> None:
    path = _save(tmp_path / "blank.nii.gz", np.full((8, 8, 8), value, np.float32))
    with pytest.raises(InputError, match=f"every voxel is {value:g} .*constant"):
        load_volume(path, 1, 1 << 30)


def test_channel_count_is_checked_against_the_model(tmp_path: Path) -> None:
    from producer.submit import check_volume

    model = load_model_spec(write_model(tmp_path / "m", "UNet", roi=32, feature_size=4))
    path = write_volume(tmp_path / "two.nii.gz", (8, 8, 8, 2))
    with pytest.raises(InputError, match=r"has 2 channel\(s\) but the model takes 1 \(in_channels"):
        check_volume(path, model, 1 << 30)


# --- item 4: a full disk must not keep the temp file's space ------------------------------------------------

LEAK_PROBE = """
import gc, os, resource, sys
from pathlib import Path
import nibabel as nib, numpy as np
from worker import jobs
out = Path(sys.argv[1])
source = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # a disk with 100 kB free
noise = np.random.default_rng(0).random((60, 60, 60)).astype(np.float32)  # 864 kB, incompressible
errors = []
for _ in range(3):  # the first failure, then two retries before any space is freed
    try:
        jobs._write_nifti(noise, source, out / "a_seg.nii.gz")
    except Exception as exc:
        errors.append(exc)  # kept, as Celery keeps a failed task's exception and traceback
gc.collect()
held = []
for fd in os.listdir("/proc/self/fd"):
    try:
        held.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space freed
jobs._write_nifti(noise, source, out / "a_seg.nii.gz")
print(len(errors), sorted(h for h in held if ".tmp-" in h))
print(errors[0])
"""


def test_a_full_disk_leaves_no_open_temp_file_and_a_retry_works(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", LEAK_PROBE, str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    counts, message = result.stdout.strip().splitlines()
    assert counts.split()[0] == "3", result.stdout
    assert counts.endswith("[]"), f"temp files still open after the failures: {result.stdout}"
    assert "refuses a file this large" in message and "then `segq retry --failed`" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_seg.nii.gz"]
    data = np.asarray(nib.load(str(tmp_path / "a_seg.nii.gz")).dataobj)
    assert data.shape == (60, 60, 60) and data.dtype == np.float32


# --- item 7: a failed job leaves no subtask running ---------------------------------------------------------

def _job(status: Status = Status.QUEUED, **fields: object) -> str:
    from segq.db import session_scope
    from segq.models import Dataset, Job

    with session_scope() as s:
        ds = Dataset(name="d", out_dir="/out", model_path="/m", model_sha256="0" * 64, params={})
        s.add(ds)
        s.flush()
        job = Job(dataset_id=ds.id, input_path=f"/in/{ds.id}.nii.gz", input_sha256="0" * 64, fingerprint="f",
                  output_path=f"/out/{ds.id}_seg.nii.gz", status=status, **fields)
        s.add(job)
        s.flush()
        return job.id


def test_fail_job_ends_its_unfinished_subtasks(sqlite_db: None) -> None:
    from sqlalchemy import select

    from segq import records
    from segq.db import session_scope
    from segq.models import Subtask

    job_id = _job()
    assert records.record_plan(job_id, 0, shape=[8, 8, 8], spacing=[1, 1, 1], windows=3, slab_windows=[1, 1, 1],
                               preprocess_seconds=0.1, backend="torch", precision="fp32")
    records.start_subtask(job_id, 0, 0, "w")
    records.finish_subtask(job_id, 0, 0, 1.0, 1)
    records.start_subtask(job_id, 0, 1, "w")
    assert records.fail_job(job_id, "slab 1: boom", 0)
    assert records.start_subtask(job_id, 0, 2, "w") == 1  # a late delivery of a sibling slab
    with session_scope() as s:
        states = {p.slab: p.status for p in s.scalars(select(Subtask).where(Subtask.job_id == job_id))}
    assert states == {0: Status.DONE, 1: Status.CANCELLED, 2: Status.CANCELLED}


# --- item 13: busy time without queue waits, an ETA with the merges -----------------------------------------

def test_eta_counts_the_merges_still_to_run() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    jobs = [JobSample("a", Status.DONE, 4, 1, now - timedelta(seconds=50), now - timedelta(seconds=30), 20.0),
            JobSample("b", Status.RUNNING, 4, 1, now - timedelta(seconds=30), None)]
    from producer.watch import PartSample, RecentPart

    parts = [PartSample("b", Status.DONE, 4)]  # every window of b ran: only its merge is left
    recent = [RecentPart("w", 4, now - timedelta(seconds=5))]
    snap = summarize(jobs, parts, [], recent, now)
    assert snap.windows_remaining == 0 and snap.eta_seconds == pytest.approx(20.0)


# --- item 8: a wrong --truth folder must not replace stored Dice --------------------------------------------

def test_evaluate_with_a_wrong_truth_folder_stores_nothing(sqlite_db: None, tmp_path: Path) -> None:
    from producer.evaluate import evaluate
    from segq.db import session_scope
    from segq.models import Job

    rng = np.random.default_rng(0)
    masks = {name: (rng.random((16, 16, 16)) > 0.5).astype(np.uint8) for name in ("a", "b")}
    ids = {}
    for name, mask in masks.items():
        job_id = _job(Status.DONE)
        with session_scope() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.input_path = f"/in/{name}.nii.gz"
            job.output_path = str(_save(tmp_path / "out" / f"{name}.nii.gz", mask))
            job.dataset_id = s.get(Job, ids.get("a", job_id)).dataset_id  # type: ignore[union-attr]
        ids[name] = job_id
    dataset = _dataset_of(ids["a"])
    _save(tmp_path / "truth" / "a.nii.gz", masks["a"])
    _save(tmp_path / "truth" / "b.nii.gz", masks["b"])
    first = evaluate(dataset, tmp_path / "truth")
    assert [score.dice for score in first] == [1.0, 1.0]
    _save(tmp_path / "other" / "a.nii.gz", (rng.random((16, 16, 16)) > 0.5).astype(np.uint8))  # another dataset's
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no ground truth for any of the 2 done volume") as info:
        evaluate(dataset, tmp_path / "empty")
    _one_line(str(info.value))
    with pytest.raises(InputError, match=r"1 volume\(s\) already have Dice scores \(mean 1.0000\).*--replace"):
        evaluate(dataset, tmp_path / "other")
    assert _dice(ids) == {"a": 1.0, "b": 1.0}, "a refused evaluation must store nothing"
    evaluate(dataset, tmp_path / "other", replace=True)
    stored = _dice(ids)
    assert stored["b"] == 1.0, "a volume without a ground truth keeps its score"
    assert stored["a"] is not None and stored["a"] < 0.7


def _dataset_of(job_id: str) -> str:
    from segq.db import session_scope
    from segq.models import Job

    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.dataset_id


def _dice(ids: dict[str, str]) -> dict[str, float | None]:
    from segq.db import session_scope
    from segq.models import Job

    with session_scope() as s:
        return {name: s.get(Job, job_id).dice for name, job_id in ids.items()}  # type: ignore[union-attr]


def test_train_demo_never_replaces_a_model_unasked(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from producer.democli import train_demo

    missing = CliRunner().invoke(train_demo, [])
    assert missing.exit_code == 2 and "Missing option '-o'" in missing.output
    (tmp_path / "model.toml").write_text("kept")
    refused = CliRunner().invoke(train_demo, ["--out", str(tmp_path), "--steps", "1"])
    assert refused.exit_code == 1 and "exists: pass --overwrite" in refused.output
    assert (tmp_path / "model.toml").read_text() == "kept"


def test_only_live_jobs_of_another_dataset_own_an_output(sqlite_db: None) -> None:
    from producer.rows import claim_outputs as _claim_outputs
    from producer.scan import Input
    from segq.db import session_scope
    from segq.models import Dataset, Job

    failed, done = _job(Status.FAILED), _job(Status.DONE)
    with session_scope() as s:
        paths = {job_id: Path(s.get(Job, job_id).output_path) for job_id in (failed, done)}  # type: ignore[union-attr]
        other = Dataset(name="b", out_dir="/out", model_path="/m", model_sha256="1" * 64, params={})
        s.add(other)
        s.flush()
        _claim_outputs(s, other, [Input(Path("/in/x.nii.gz"), paths[failed])], overwrite=False)  # wrote nothing
        with pytest.raises(InputError, match=r"1 output\(s\) already belong to dataset\(s\) .*--overwrite"):
            _claim_outputs(s, other, [Input(Path("/in/y.nii.gz"), paths[done])], overwrite=False)
        _claim_outputs(s, other, [Input(Path("/in/y.nii.gz"), paths[done])], overwrite=True)
        taken = s.get(Job, done)
        assert taken is not None and taken.status == Status.CANCELLED and "taken over by dataset" in (taken.error or "")
