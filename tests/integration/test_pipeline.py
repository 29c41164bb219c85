"""The whole queue path against MONAI: real Redis, real `segq worker` processes, SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import Stack
from tests.helpers import ROOT, load_mask, reference_probability, write_nan_volume, write_volume

pytestmark = pytest.mark.integration


def segq(*args: str, env: dict[str, str], check: bool = True,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "segq.cli", *args], env={**os.environ, **env}, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"segq {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def run_dataset(stack: Stack, scans: Path, out: Path, model: Path, *extra: str,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    return segq("submit", str(scans), "--out", str(out), "--model", str(model), "--wait", "--timeout", "240",
                *extra, env=stack.env, check=check)


def assert_matches_reference(prob_path: Path, mask_path: Path, reference: np.ndarray) -> None:
    prob = np.asarray(nib.load(str(prob_path)).dataobj)
    np.testing.assert_allclose(prob, reference, atol=1e-4, rtol=0)
    mask = load_mask(mask_path)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    decided = np.abs(reference - 0.5) > 1e-4
    np.testing.assert_array_equal(mask[decided], (reference >= 0.5)[decided].astype(np.uint8))


SHAPES = {
    "odd": (37, 41, 29),
    "aniso": (50, 20, 33),
    "small": (20, 45, 12),  # two dimensions smaller than the ROI: padded like MONAI
    "large": (70, 40, 36),  # splits into at least 3 subtasks of 4 windows
}


def test_dataset_matches_monai_and_is_recorded(stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    for i, (name, shape) in enumerate(SHAPES.items()):
        write_volume(scans / f"{name}.nii.gz", shape, seed=i, spacing=(0.8, 1.1, 2.5))
    out = tmp_path / "masks"
    result = run_dataset(stack, scans, out, unet_model, "--name", f"shapes-{tmp_path.name}", "--save-probabilities")
    assert result.stdout.count("done    ") == len(SHAPES), result.stdout

    rows = json.loads(segq("results", f"shapes-{tmp_path.name}", "--format", "json", env=stack.env).stdout)
    by_name = {Path(r["input"]).name: r for r in rows}
    assert set(by_name) == {f"{n}.nii.gz" for n in SHAPES}
    for name, shape in SHAPES.items():
        row = by_name[f"{name}.nii.gz"]
        mask_path = out / f"{name}_seg.nii.gz"
        assert row["status"] == "done" and row["output"] == str(mask_path)
        image = nib.load(str(mask_path))
        assert image.shape == shape
        np.testing.assert_allclose(image.affine, np.diag([0.8, 1.1, 2.5, 1.0]))
        reference = reference_probability(scans / f"{name}.nii.gz", unet_model)
        assert_matches_reference(out / f"{name}_prob.nii.gz", mask_path, reference)
        mask = load_mask(mask_path)
        assert row["tumour_voxels"] == int(mask.sum())
        assert row["tumour_ml"] == pytest.approx(mask.sum() * 0.8 * 1.1 * 2.5 / 1000, rel=1e-3)
        assert row["windows"] >= 1 and row["subtasks"] >= 1 and row["workers"].startswith("w1@")
        assert row["backend"] == "torch" and len(row["model_sha256"]) == 64
        assert row["queued_at"] and row["started_at"] and row["finished_at"] and row["inference_seconds"] > 0
    assert by_name["large.nii.gz"]["subtasks"] >= 3
    assert by_name["small.nii.gz"]["subtasks"] == 1
    csv = segq("results", f"shapes-{tmp_path.name}", "--format", "csv", env=stack.env).stdout.splitlines()
    assert csv[0].startswith("dataset,job,input,output,status,error,tumour_voxels,tumour_ml") and len(csv) == 5
    assert not list((Path(stack.env["SEGQ_STORAGE"]) / "jobs").glob("*")), "workspaces must be deleted"


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_bad_volumes_fail_alone_with_reasons(stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    write_volume(scans / "good.nii.gz", (30, 30, 30), seed=1)
    _truncate(write_volume(scans / "truncated.nii.gz", (40, 40, 40), seed=2), 0.5)
    short = write_volume(scans / "short.nii", (40, 40, 40), seed=3)
    _truncate(short, 0.6)  # the header promises more voxels than the file holds
    write_nan_volume(scans / "nan.nii.gz", at=(3, 4, 5))
    garbage = scans / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(bytes(range(256)) * 2)[:200])
    garbage.unlink()  # an unreadable header is refused at submit; tested separately below

    out = tmp_path / "masks"
    result = run_dataset(stack, scans, out, unet_model, "--name", f"bad-{tmp_path.name}", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    status = segq("status", f"bad-{tmp_path.name}", env={**stack.env, "COLUMNS": "250"}).stdout
    rows = {Path(r["input"]).name: r for r in
            json.loads(segq("results", f"bad-{tmp_path.name}", "--format", "json", env=stack.env).stdout)}
    assert rows["good.nii.gz"]["status"] == "done" and (out / "good_seg.nii.gz").is_file()
    expected = {
        "truncated.nii.gz": "corrupt or truncated",
        "short.nii": "corrupt or truncated",
        "nan.nii.gz": "NaN or infinite",
    }
    for name, reason in expected.items():
        assert rows[name]["status"] == "failed", rows[name]
        assert reason in rows[name]["error"], rows[name]["error"]
        assert not (out / name.replace(".nii.gz", "_seg.nii.gz").replace(".nii", "_seg.nii.gz")).exists()
    assert "failed" in status and "NaN" in status
    assert not list(out.glob(".*tmp*")), "no temp files may be left"


def test_submit_refuses_missing_and_unreadable_inputs(stack: Stack, unet_model: Path, tmp_path: Path) -> None:
    import redis

    scans = tmp_path / "scans"
    write_volume(scans / "ok.nii.gz", (20, 20, 20))
    before = len(segq("results", "--format", "csv", env=stack.env).stdout.splitlines())
    queued_before = redis.Redis.from_url(stack.env["SEGQ_BROKER_URL"]).llen("coordinator")

    missing = segq("submit", str(scans), str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "o"),
                   "--model", str(unet_model), env=stack.env, check=False)
    assert missing.returncode != 0 and "nope.nii.gz does not exist" in missing.stderr

    (scans / "broken.nii").write_bytes(b"not a nifti file at all")
    unreadable = segq("submit", str(scans), "--out", str(tmp_path / "o"), "--model", str(unet_model),
                      env=stack.env, check=False)
    assert unreadable.returncode != 0 and "broken.nii: not a readable NIfTI file" in unreadable.stderr

    no_model = segq("submit", str(scans / "ok.nii.gz"), "--out", str(tmp_path / "o"), "--model",
                    str(tmp_path / "missing.toml"), env=stack.env, check=False)
    assert no_model.returncode != 0 and "missing.toml" in no_model.stderr

    assert len(segq("results", "--format", "csv", env=stack.env).stdout.splitlines()) == before
    assert redis.Redis.from_url(stack.env["SEGQ_BROKER_URL"]).llen("coordinator") == queued_before
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_swinunetr_end_to_end_in_three_subtasks(stack: Stack, swin_model: Path, tmp_path: Path) -> None:
    if "postgres" in stack.env["SEGQ_DATABASE_URL"]:
        pytest.skip("the SwinUNETR path is database-independent; run once, on SQLite, to save CPU time")
    scans = tmp_path / "scans"
    write_volume(scans / "ct.nii.gz", (64, 60, 128), seed=7, spacing=(0.9, 0.9, 1.5))
    out = tmp_path / "masks"
    run_dataset(stack, scans, out, swin_model, "--max-windows-per-subtask", "1", "--name", f"swin-{tmp_path.name}",
                "--save-probabilities")
    row = json.loads(segq("results", f"swin-{tmp_path.name}", "--format", "json", env=stack.env).stdout)[0]
    assert row["status"] == "done" and row["windows"] == 3 and row["subtasks"] == 3
    reference = reference_probability(scans / "ct.nii.gz", swin_model)
    assert_matches_reference(out / "ct_prob.nii.gz", out / "ct_seg.nii.gz", reference)
