"""MONAI bundles through real workers, against the bundle's own ``python -m monai.bundle run``.

For tiny bundles in the shapes of five Model Zoo bundles (tests/bundles.py: the real configs, small networks,
random weights), segq's label map must equal what MONAI's own runner writes for the same inputs: at least 99.9%
of voxels equal and Dice at least 0.999 for every label present (differences only at ties). The inputs are
anisotropic, in LPS and oblique orientations, and each shape has a case within one part and one split into
several (the stack's SEGQ_MAX_WINDOWS_PER_SUBTASK is 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segq import labelmaps
from tests.bundles import SHAPES, make_bundle, make_bundle_zip, make_case, run_bundle_oracle
from tests.conftest import Stack
from tests.integration.test_pipeline import run_dataset, segq

pytestmark = [pytest.mark.integration]

# One case within a part, one split over several: sizes on each bundle's model grid give that.
CASES = {
    "spleen": [("lps", "LPS", (40, 36, 16)), ("oblique", "oblique", (72, 64, 30))],
    "btcv": [("lps", "LPS", (60, 56, 30)), ("oblique", "oblique", (130, 120, 56))],
    "brats": [("BRATS_001", "LPS", (40, 36, 16)), ("BRATS_002", "oblique", (56, 52, 28))],
    "wholebody": [("lps", "LPS", (44, 40, 16)), ("oblique", "oblique", (90, 80, 36))],
    "prostate": [("lps", "LPS", (24, 22, 6)), ("oblique", "oblique", (44, 40, 16))],
}
TRUSTED = {"brats"}  # its label mapping is a $lambda: run as code only with --trust-model


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, dict[int, float]]:
    """Voxel agreement and per-label Dice over every label either map holds (background excluded)."""
    dice = {}
    for value in sorted(set(np.unique(ours)) | set(np.unique(theirs)) - {0}):
        a, b = ours == value, theirs == value
        dice[int(value)] = 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())
    return float(np.mean(ours == theirs)), dice


def device_preprocessed(stack: Stack) -> int:
    """How many cases the stack's GPU workers have preprocessed (worker.jobs.run_on_device's log line)."""
    return sum(log.read_text(errors="replace").count("a case's preprocessing on")
               for log in stack.root.glob("*.log"))


def make_dataset(shape: str, root: Path) -> tuple[Path, Path, list[list[Path]]]:
    bundle = make_bundle(shape, root)
    scans = root / "scans"
    cases = [make_case(shape, scans, name, orientation=orientation, size=size, seed=i)
             for i, (name, orientation, size) in enumerate(CASES[shape])]
    return bundle, scans, cases


def check_against_oracle(shape: str, bundle: Path, cases: list[list[Path]], out: Path, oracle_dir: Path) -> None:
    oracle = run_bundle_oracle(bundle, cases, oracle_dir)
    for case, theirs_path in zip(cases, oracle, strict=True):
        name = case[0].name.removesuffix(".nii.gz").removesuffix("_0000")
        ours_path = out / f"{name}_seg.nii.gz"
        ours_image, theirs_image = nib.load(str(ours_path)), nib.load(str(theirs_path))
        ours = np.asarray(ours_image.dataobj)
        # prostate's Invertd resamples its argmax bilinearly: its own run saves the fractions, segq the nearest label
        theirs = np.rint(np.squeeze(np.asarray(theirs_image.dataobj))).astype(np.int64)
        source = nib.load(str(case[0]))
        assert ours.shape == source.shape[:3] == theirs.shape, (ours.shape, theirs.shape)
        np.testing.assert_allclose(ours_image.affine, source.affine, atol=1e-5)
        assert ours.dtype == np.uint8
        agree, dice = agreement(ours.astype(np.int64), theirs)
        assert len(set(np.unique(theirs))) >= 2, f"{shape} {name}: the oracle's map is one label; a weak test"
        assert agree >= 0.999, f"{shape} {name}: {agree:.5f} of voxels agree with monai.bundle run"
        assert min(dice.values()) >= 0.999 or agree == 1.0, f"{shape} {name}: per-label Dice {dice}"


@pytest.mark.parametrize("shape", SHAPES)
def test_bundle_label_maps_equal_monai_bundle_run(shape: str, stack: Stack, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    if "postgres" in request.node.callspec.id and shape != "spleen":
        pytest.skip("one bundle shape on PostgreSQL: the database does not touch the arithmetic")
    bundle, scans, cases = make_dataset(shape, tmp_path)
    out = tmp_path / "out"
    extra = ["--trust-model"] if shape in TRUSTED else []
    before = device_preprocessed(stack)
    result = run_dataset(stack, scans, out, bundle, "--name", f"bundle-{shape}-{tmp_path.name}", *extra)
    assert result.stdout.count("done    ") == len(cases), result.stdout
    check_against_oracle(shape, bundle, cases, out, tmp_path / "oracle")
    names = labelmaps.read_names(out / f"{cases[0][0].name.removesuffix('.nii.gz').removesuffix('_0000')}_seg.nii.gz")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert names is not None and all(names[int(k)] == v for k, v in channel_def.items() if int(k) in names)
    rows = json.loads(segq("results", f"bundle-{shape}-{tmp_path.name}", "--format", "json", env=stack.env).stdout)
    assert len(rows) == len(cases) and all(row["status"] == "done" for row in rows)
    # each case in one part ran the rest of its preprocessing on its GPU worker; each split one at prepare
    whole = sum(row["subtasks"] == 1 for row in rows)
    assert 0 < whole < len(rows), f"{shape}: CASES must give one case in one part and one split, got {rows}"
    assert device_preprocessed(stack) - before == whole
    for row in rows:  # the row's labelled voxels are the map's
        labels = np.asarray(nib.load(row["output"]).dataobj)
        assert row["tumour_voxels"] == int(np.count_nonzero(labels))


def test_bundle_zip_and_refusals(stack: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "postgres" in request.node.callspec.id:
        pytest.skip("refusals happen at submit, before the database matters")
    bundle, scans, cases = make_dataset("brats", tmp_path)
    out = tmp_path / "out"
    refused = run_dataset(stack, scans, out, bundle, check=False)
    assert refused.returncode != 0
    assert "postprocessing#transforms#3#func" in refused.stderr and "--trust-model" in refused.stderr
    assert not out.exists() or not list(out.iterdir())
    spleen = make_bundle("spleen", tmp_path / "z")
    archive = make_bundle_zip(spleen)
    scans = tmp_path / "ct"
    ct = [make_case("spleen", scans, "zipped", orientation="oblique", size=(40, 36, 16))]
    result = run_dataset(stack, scans, tmp_path / "zout", archive, "--name", f"zip-{tmp_path.name}")
    assert result.stdout.count("done    ") == 1, result.stdout
    check_against_oracle("spleen", spleen, ct, tmp_path / "zout", tmp_path / "zoracle")


def test_dicom_series_through_a_bundle(stack: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A CT series through the btcv bundle: its label map equals monai.bundle run's on the same voxels as NIfTI,
    and its SEG has one segment per organ, named from the bundle's metadata."""
    if "postgres" in request.node.callspec.id:
        pytest.skip("the series' arithmetic does not touch the database")
    import highdicom as hd

    from tests.dicom_helpers import oblique_affine, write_series

    bundle = make_bundle("btcv", tmp_path)
    [nifti] = make_case("btcv", tmp_path / "nifti", "ct", orientation="RAS", size=(60, 56, 30))
    image = nib.load(str(nifti))
    data, affine = np.asarray(image.dataobj).astype(np.float32), oblique_affine()
    nib.save(nib.Nifti1Image(data, affine), str(nifti))  # the series' own geometry, as NIfTI for the oracle
    write_series(tmp_path / "dicom" / "ct", data, affine, slope=1.0, intercept=-1024.0)
    out = tmp_path / "out"
    result = run_dataset(stack, tmp_path / "dicom", out, bundle, "--name", f"dicom-bundle-{tmp_path.name}")
    assert result.stdout.count("done    ") == 1, result.stdout
    [ours_path] = list(out.rglob("*_seg.nii.gz"))
    [theirs_path] = run_bundle_oracle(bundle, [[nifti]], tmp_path / "oracle")
    ours = np.asarray(nib.load(str(ours_path)).dataobj).astype(np.int64)
    theirs = np.rint(np.squeeze(np.asarray(nib.load(str(theirs_path)).dataobj))).astype(np.int64)
    agree, dice = agreement(ours, theirs)
    assert agree >= 0.999 and len(dice) >= 2, (agree, dice)
    seg = hd.seg.segread(str(next(out.rglob("*_seg.dcm"))))
    names = load_names(bundle)
    described = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert sorted(described.values()) == sorted(v for k, v in names.items() if k != 0)


def load_names(bundle: Path) -> dict[int, str]:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    return {int(k): v for k, v in metadata["network_data_format"]["outputs"]["pred"]["channel_def"].items()}
