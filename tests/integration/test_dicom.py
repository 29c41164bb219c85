"""DICOM series through real workers: the same mask as the NIfTI path, a SEG on the same anatomy that an
independent validator accepts, hostile files refused one line each while the rest of the dataset is done."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import Stack
from tests.dicom_helpers import (
    oblique_affine,
    write_enhanced,
    write_localizer,
    write_series,
    write_truncated,
    write_undecodable,
)
from tests.helpers import load_mask
from tests.integration.test_pipeline import segq

pytestmark = pytest.mark.integration

SHAPE = (40, 36, 24)
# pydicom's own test files: real scans nobody here wrote. None of those bundled in the wheel is a volume.
REAL_FILES = {"CT_small.dcm": "a single slice", "MR_small.dcm": "a single slice",
              "rtplan.dcm": "holds no image", "rtdose.dcm": "RTDOSE object"}


# what write_series puts in every file to identify the patient (tests/dicom_helpers.py)
PATIENT = re.compile(r"\bDoe\b|\bJane\b|PID-SECRET|19700101")
# an inline image's base64 payload, which can spell anything
INLINE_IMAGE = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+")


def _names_patient(text: str) -> list[str]:
    """The patient identifiers found in text, outside inline images."""
    return PATIENT.findall(INLINE_IMAGE.sub("", text))


def _volume(seed: int = 0) -> np.ndarray:
    """Noise around a bright ellipsoid, in steps of the rescale slope (0.5) so the stored ints are exact."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE).astype(np.float32)
    centre = np.array([22, 15, 10], np.float32).reshape(3, 1, 1, 1)
    blob = (((grid - centre) / np.array([9, 7, 5], np.float32).reshape(3, 1, 1, 1)) ** 2).sum(0) < 1
    data = rng.normal(0, 40, SHAPE) + 300 * blob
    return (np.round(data * 2) / 2).astype(np.float32)


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ [*np.argwhere(mask > 0).mean(0), 1.0])[:3]


def _hostile(scans: Path, good: list[Path]) -> dict[str, str]:
    """Bad DICOM beside the good series; what each refusal line must say."""
    data, affine = _volume(5), oblique_affine()
    write_series(scans / "missing", data, affine, skip=(7,))
    write_series(scans / "duplicate", data, affine, duplicate=(4,))
    write_series(scans / "thin", data[:, :, :3], affine)
    scout = write_series(scans / "scouted", data, affine)
    write_localizer(scans / "scouted" / "scout.dcm", scout[0])
    (scans / "broken").mkdir()
    write_truncated(scans / "broken" / "truncated.dcm", good[0])
    write_undecodable(scans / "broken" / "mpeg2.dcm", good[1])
    (scans / "broken" / "notdicom.dcm").write_text("a text file renamed .dcm\n")
    from pydicom.data import get_testdata_file

    (scans / "real").mkdir()
    for name in REAL_FILES:
        found = get_testdata_file(name, download=False)
        assert found, f"pydicom's wheel no longer ships {name}"
        shutil.copy(str(found), scans / "real" / name)
    return {"missing": "missing slices", "duplicate": "duplicated slices", "thin": "too thin for the model",
            "scouted": "mixed orientations", "truncated.dcm": "truncated", "mpeg2.dcm": "no installed decoder",
            "notdicom.dcm": "not a DICOM file", **REAL_FILES}


def test_dicom_series_match_nifti_and_write_valid_seg(stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    data, affine = _volume(), oblique_affine()
    nifti_dir, scans = tmp_path / "nifti", tmp_path / "dicom"
    nifti_dir.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(nifti_dir / "vol.nii.gz"))
    ct = write_series(scans / "ct", data, affine, names="IM{k:05d}")  # no .dcm suffix: found by content
    write_series(scans / "mr", data, affine, modality="MR", slope=1.0, intercept=0.0, seed=3)
    write_enhanced(scans / "enhanced" / "ct.dcm", ct)
    refusals = _hostile(scans, ct)
    out, name = tmp_path / "masks", f"dicom-{tmp_path.name}"

    result = _submit(stack, [nifti_dir, scans], out, unet_model, name)
    assert result.returncode == 1, result.stdout + result.stderr  # something was refused
    refused = [line for line in result.stderr.splitlines() if line.startswith("refused ")]
    assert len(refused) == len(refusals), "\n".join(refused)
    for what, reason in refusals.items():
        where = what if what.endswith(".dcm") else str(scans / what)
        assert sum(where in line and reason in line for line in refused) == 1, (what, reason, refused)
    assert result.stdout.count("done    ") == 4, result.stdout

    rows = json.loads(segq("results", name, "--format", "json", env=stack.env).stdout)
    assert all(r["status"] == "done" for r in rows) and len(rows) == 4
    nifti_row = next(r for r in rows if r["modality"] is None)
    nifti_mask = load_mask(out / "vol_seg.nii.gz")
    assert 0 < nifti_mask.sum() < nifti_mask.size, "the test needs a mask with both classes"
    series_rows = [r for r in rows if r["modality"]]
    assert sorted(r["modality"] for r in series_rows) == ["CT", "CT", "MR"]
    for row in series_rows:
        output = Path(row["output"])
        assert output.name == f"{row['series_uid']}_seg.nii.gz" and row["output_format"] == "both"
        assert row["study_uid"] and Path(row["input"]).name == row["series_uid"]
        image = nib.load(str(output))
        np.testing.assert_allclose(image.affine, affine, atol=1e-4)
        mask = np.asarray(image.dataobj)
        if row["modality"] == "CT":
            # same voxels in, same mask out: the single-frame and the enhanced CT (the MR is stored unscaled,
            # so its voxels are rounded)
            np.testing.assert_array_equal(mask, nifti_mask)
        assert row["tumour_voxels"] == int(mask.sum())
        _check_seg(output.with_name(f"{row['series_uid']}_seg.dcm"), mask, affine)
    assert nifti_row["tumour_voxels"] == int(nifti_mask.sum())

    # No patient name or identifier in what segq shows or logs.
    shown = (segq("results", name, "--format", "csv", env=stack.env).stdout + result.stdout + result.stderr
             + segq("status", name, env=stack.env).stdout + "".join(w.read_log() for w in stack.workers))
    assert _names_patient(shown) == []

    again = _submit(stack, [nifti_dir, scans], out, unet_model, name)
    assert "queued 0 volume(s), 4 already done" in again.stdout, again.stdout

    # the same series in another dataset: its NIfTI mask and SEG are copied, nothing is segmented again
    copied = _submit(stack, [scans], tmp_path / "copies", unet_model, f"{name}-copy")
    assert "queued 0 volume(s), 3 already done" in copied.stdout, copied.stdout
    assert len(list((tmp_path / "copies").rglob("*_seg.dcm"))) == 3

    # the report draws each series' mid-slice, and names no patient
    report = segq("report", name, "-o", str(tmp_path / "report.html"), env=stack.env)
    assert "no mid-slice" not in report.stderr, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and _names_patient(page) == []
    assert all(row["series_uid"] in page for row in series_rows)

    # evaluate finds a series' ground truth by its Series Instance UID
    truth = tmp_path / "truth"
    truth.mkdir()
    single = next(r for r in series_rows if r["modality"] == "CT")
    nib.save(nib.Nifti1Image(nifti_mask, affine), str(truth / f"{single['series_uid']}.nii.gz"))
    segq("evaluate", name, "--truth", str(truth), env=stack.env)
    scored = {r["series_uid"]: r["dice"] for r in json.loads(segq("results", name, "--format", "json",
                                                                   env=stack.env).stdout)}
    assert scored[single["series_uid"]] == 1.0


def _submit(stack: Stack, inputs: list[Path], out: Path, model: Path, name: str) -> subprocess.CompletedProcess[str]:
    return segq("submit", *map(str, inputs), "--out", str(out), "--model", str(model), "--name", name, "--wait",
                "--timeout", "240", env=stack.env, check=False)


def _check_seg(path: Path, mask: np.ndarray, affine_ras: np.ndarray) -> None:
    """Read back with highdicom: the same voxels at the same scanner coordinates; dciodvfy finds no error."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    assert seg.SegmentSequence[0].SegmentLabel == "tumour"
    assert seg.SegmentationType == "BINARY"
    volume = seg.get_volume(combine_segments=True)
    assert int(volume.array.sum()) == int(mask.sum())
    lps = np.diag([-1.0, -1.0, 1.0]) @ _centroid(mask, affine_ras)
    spacing = float(np.linalg.norm(affine_ras[:3, :3], axis=0).min())
    assert np.linalg.norm(_centroid(volume.array, volume.affine) - lps) < spacing
    validator = shutil.which("dciodvfy")
    assert validator, "dciodvfy (Debian's dicom3tools) is needed: scripts/setup.sh installs it"
    report = subprocess.run([validator, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def test_dicom_jobs_resume_after_a_lost_queue_and_retry_after_a_fix(fresh_stack: Stack, unet_model: Path,
                                                                      tmp_path: Path) -> None:
    import redis

    stack, scans, out, name = fresh_stack, tmp_path / "scans", tmp_path / "masks", "dicom-resume"
    first = write_series(scans / "a", _volume(), oblique_affine())
    write_series(scans / "b", _volume(1), oblique_affine(degrees=-10))
    queued = segq("submit", str(scans), "--out", str(out), "--model", str(unet_model), "--name", name, env=stack.env)
    assert "queued 2 volume(s)" in queued.stdout, queued.stdout
    redis.Redis.from_url(stack.env["SEGQ_BROKER_URL"]).flushdb()  # the queue is lost before any worker ran
    aside = first[5].rename(tmp_path / "aside.dcm")  # and a slice of one series goes missing meanwhile

    resumed = segq("resume", name, env=stack.env)
    assert "re-queued 2 unfinished job(s)" in resumed.stdout, resumed.stdout
    stack.worker("w1")
    assert segq("watch", name, "--timeout", "240", env=stack.env, check=False).returncode == 1
    rows = {r["series_uid"]: r for r in json.loads(segq("results", name, "--format", "json", env=stack.env).stdout)}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "gone since submit" in failed[0]["error"], rows

    aside.rename(first[5])  # the slice is back: retry runs that series again, alone
    assert "re-queued 1 job(s)" in segq("retry", name, "--failed", env=stack.env).stdout
    assert segq("watch", name, "--timeout", "240", env=stack.env, check=False).returncode == 0
    rows = {r["series_uid"]: r for r in json.loads(segq("results", name, "--format", "json", env=stack.env).stdout)}
    assert all(r["status"] == "done" for r in rows.values()) and len(rows) == 2
    assert all(Path(r["output"]).with_name(f"{uid}_seg.dcm").is_file() for uid, r in rows.items())
