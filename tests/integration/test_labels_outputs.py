"""Label maps' names through `segq results`, `segq evaluate` and `segq report` on a real SQLite database, and
through a multi-segment DICOM SEG that dciodvfy accepts and highdicom reads back voxel for voxel.

The jobs are inserted as a worker leaves them (done, with their ``labels``) beside label maps written here, so
the known answers (voxels, mL, Dice) are exact and no worker has to run.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner, Result

from segq import labelmaps
from segq.models import Dataset, Job, Status
from segq.modelspec import ModelSpec
from tests.conftest import Stack
from tests.dicom_helpers import oblique_affine, write_series

pytestmark = pytest.mark.integration

SHAPE = (20, 18, 12)
SPACING = (1.0, 1.0, 2.0)  # 0.002 mL a voxel
NAMES = {0: "background", 1: "spleen", 2: "Left Kidney", 3: "liver & <b>vessels</b>"}


def invoke(*args: str) -> Result:
    from segq.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _save(path: Path, data: np.ndarray, names: dict[int, str] | None = None) -> Path:
    image = nib.Nifti1Image(data, np.diag([*SPACING, 1.0]))
    if names is not None:
        image.header.extensions.append(labelmaps.nifti_extension(names))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each case's label map and truth, with overlaps whose Dice is known."""
    pred0, truth0 = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.int16)
    pred0[0:2, 0:2, 0:2], truth0[1:3, 0:2, 0:2] = 1, 1  # spleen: 8 and 8 voxels, 4 shared: 0.5
    pred0[5:8, 5:7, 5:6] = truth0[5:8, 5:7, 5:6] = 2  # left kidney: 1.0; liver in neither
    pred1, truth1 = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    pred1[0:2, 0:2, 0:2] = truth1[0:2, 0:2, 0:2] = 1  # spleen: 1.0
    pred1[10:12, 10:12, 0:1] = 3  # liver only in the mask: 0.0
    truth1[5:6, 5:6, 5:8] = 2  # left kidney only in the truth: 0.0
    return {"case0": (pred0, truth0), "case1": (pred1, truth1)}


def _insert(name: str, labels: dict[int, str] | None, masks: dict[str, np.ndarray], root: Path) -> str:
    """A dataset of done jobs as the worker records them; returns its id."""
    from segq.db import session_scope

    if labels is None:
        spec = ModelSpec("UNet", 1, 2, 32, 1, root / "model.pt")
    else:
        spec = ModelSpec("bundle", 1, len(labels), 32, 0, root / "model.pt", format="bundle",
                         labels={str(k): v for k, v in labels.items()})
    names = spec.label_names()
    with session_scope() as s:
        ds = Dataset(name=name, out_dir=str(root / name), model_path=str(root), model_sha256="b" * 64,
                     params={**spec.params(), "model": spec.to_dict()})
        s.add(ds)
        s.flush()
        for case, mask in masks.items():
            scan = _save(root / "scans" / f"{case}.nii.gz", np.random.default_rng(0).normal(size=SHAPE)
                         .astype(np.float32))
            output = _save(root / name / f"{case}_seg.nii.gz", mask, names if labels else None)
            stats = labelmaps.label_volumes(mask, names, 0.002)
            voxels = sum(int(e["voxels"]) for e in stats)
            s.add(Job(dataset_id=ds.id, input_path=str(scan), input_sha256=case, fingerprint=f"{name}-{case}",
                      output_path=str(output), status=Status.DONE, tumour_voxels=voxels,
                      tumour_ml=round(voxels * 0.002, 4), labels=stats, windows=1, subtasks=1))
        return ds.id


@pytest.fixture
def store(fresh_stack: Stack, tmp_path: Path) -> Path:
    """A SQLite database (the fresh stack's, no worker) holding a label-map dataset and a binary one."""
    cases = _cases()
    _insert("organs", NAMES, {case: pred for case, (pred, _) in cases.items()}, tmp_path)
    binary = {case: (pred > 0).astype(np.uint8) for case, (pred, _) in cases.items()}
    _insert("tumours", None, binary, tmp_path)
    for case, (_, truth) in cases.items():
        _save(tmp_path / "truth" / f"{case}.nii.gz", truth, NAMES)
    return tmp_path


def _csv(dataset: str) -> list[dict[str, str]]:
    result = invoke("results", dataset, "--format", "csv", "--no-summary")
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(io.StringIO(result.output)))


def test_results_evaluate_and_report_name_every_label(store: Path) -> None:
    from producer.results import COLUMNS

    binary = invoke("results", "tumours", "--format", "csv", "--no-summary").output
    assert binary.splitlines()[0] == ",".join(COLUMNS), "a binary dataset's columns are today's"
    rows = _csv("organs")
    assert list(rows[0])[len(COLUMNS):] == [f"{key}_{field}" for key in ("spleen", "left_kidney", "liver_b_vessels_b")
                                            for field in ("voxels", "ml", "dice")]
    assert [(r["spleen_voxels"], r["left_kidney_ml"], r["liver_b_vessels_b_voxels"]) for r in rows] == [
        ("8", "0.012", "0"), ("8", "0.0", "4")]

    evaluated = invoke("evaluate", "organs", "--truth", str(store / "truth"))
    assert evaluated.exit_code == 0, evaluated.output
    text = " ".join(evaluated.output.split())
    assert "per label: spleen 0.5000, Left Kidney 1.0000, liver & <b>vessels</b> absent" in text, text
    assert "per label: spleen 1.0000, Left Kidney 0.0000, liver & <b>vessels</b> 0.0000" in text, text
    assert f"mean Dice {(0.75 + 0.3333) / 2:.4f} over 2 volume(s)" in evaluated.output
    rows = _csv("organs")
    assert [(r["dice"], r["volume_error_ml"]) for r in rows] == [("0.75", "0.0"), ("0.3333", "0.002")]
    assert [(r["spleen_dice"], r["left_kidney_dice"], r["liver_b_vessels_b_dice"]) for r in rows] == [
        ("0.5", "1.0", ""), ("1.0", "0.0", "0.0")]
    stored = json.loads(invoke("results", "organs", "--format", "json", "--no-summary").output)
    assert stored[0]["liver_b_vessels_b_dice"] is None and stored[1]["spleen_dice"] == 1.0
    table = invoke("results", "organs").output
    header = table.split("┡")[0]  # rich folds long headers in the 200 columns it gets when piped
    assert "spleen_ml" in header and "spleen_dice" in header and header.count("left_kidney_") == 2, table

    again = invoke("evaluate", "tumours", "--truth", str(store / "truth"))
    assert again.exit_code == 0 and "per label" not in again.output, "binary masks score one foreground"
    assert [r["dice"] for r in _csv("tumours")] == ["0.7143", "0.6957"]  # 2*10/28 and 2*8/23

    report = store / "report.html"
    assert invoke("report", "organs", "-o", str(report)).exit_code == 0
    page = report.read_text()
    legend = re.findall(r'<li><span class="swatch" style="background:(#[0-9a-f]{6})"></span>([^<]*)</li>', page)
    assert legend == 2 * [("#1f77b4", "spleen"), ("#ff7f0e", "Left Kidney"),
                          ("#2ca02c", "liver &amp; &lt;b&gt;vessels&lt;/b&gt;")]
    assert "<b>vessels" not in page and '<table class="labels"' in page
    assert page.count('<figure class="volume">') == 2 and "image unavailable" not in page
    binary_page = store / "binary.html"
    assert invoke("report", "tumours", "-o", str(binary_page)).exit_code == 0
    assert 'class="legend"' not in binary_page.read_text()


def test_evaluate_refuses_a_truth_of_another_shape_by_name(store: Path) -> None:
    wrong = store / "wrong"
    _save(wrong / "case0.nii.gz", np.zeros((5, 5, 5), np.uint8))
    result = invoke("evaluate", "organs", "--truth", str(wrong))
    assert result.exit_code != 0
    assert f"ground truth {wrong / 'case0.nii.gz'} has shape (5, 5, 5)" in result.output, result.output
    assert all(r["dice"] == "" for r in _csv("organs")), "nothing stored"


def _dciodvfy_errors(path: Path) -> list[str]:
    validator = shutil.which("dciodvfy")
    assert validator, "dciodvfy (Debian's dicom3tools) is needed: scripts/setup.sh installs it"
    report = subprocess.run([validator, str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    return [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


def _meta(tmp_path: Path) -> Any:
    from segq.dicom import load_series
    from worker.dicomseg import SeriesMeta

    data = np.round(np.random.default_rng(1).normal(0, 40, (40, 36, 24)) * 2) / 2
    files = write_series(tmp_path / "ct", data.astype(np.float32), oblique_affine())
    loaded = load_series(files)
    return SeriesMeta([str(f) for f in files], loaded.affine.tolist(), loaded.lps_affine.tolist(),
                      loaded.frame_of_reference_uid, "both", ["tumour", "MorphologicallyAbnormalStructure",
                                                              "Neoplasm"], ["segq bundle", "0123456789abcdef"])


def _on_grid(volume: Any, lps_affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A read-back volume (cropped to its frames, its axes perhaps reversed) placed on the source grid where its
    affine puts it."""
    index = np.linalg.inv(lps_affine) @ volume.affine
    signs = np.round(np.diag(index[:3, :3]))
    np.testing.assert_allclose(index[:3, :3], np.diag(signs), atol=1e-4)  # the same grid, axes at most reversed
    array, start = volume.array, np.round(index[:3, 3]).astype(int)
    for axis in (int(a) for a in np.flatnonzero(signs < 0)):
        array, start[axis] = np.flip(array, axis), start[axis] - (array.shape[axis] - 1)
    full = np.zeros(shape, array.dtype)
    full[tuple(slice(o, o + n) for o, n in zip(start, array.shape, strict=True))] = array
    return full


def test_multi_label_seg_has_a_named_segment_per_label_and_passes_dciodvfy(tmp_path: Path) -> None:
    import highdicom as hd

    from worker.dicomseg import write_seg

    meta = _meta(tmp_path)
    labels = np.zeros((40, 36, 24), np.uint8, order="F")  # merge passes the map in NIfTI order, Fortran-ordered
    labels[5:15, 5:15, 3:10], labels[20:30, 10:20, 8:20], labels[30:35, 2:6, 15:17] = 1, 3, 7
    names = {0: "background", 1: "spleen", 2: "Left Kidney", 3: "rein gauche é", 4: "x\\y " + "z" * 80}
    out = tmp_path / "labels_seg.dcm"
    write_seg(labels, meta, out, names)
    assert not _dciodvfy_errors(out)

    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen", "Left Kidney", "rein gauche é",
                                                             "x/y " + "z" * 60, "label 7"]
    for item in seg.SegmentSequence:
        category, kind = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodeMeaning, kind.CodeValue, kind.CodeMeaning) == (
            "85756007", "Tissue", "91772007", "Organ")
    grid = np.asarray(meta.lps_affine)
    numbers = _on_grid(seg.get_volume(combine_segments=True), grid, (24, 36, 40))
    for number, value in enumerate((1, 2, 3, 4, 7), start=1):
        np.testing.assert_array_equal(numbers == number, labels.transpose(2, 1, 0) == value, err_msg=str(value))


def test_binary_seg_without_names_is_todays_one_segment(tmp_path: Path) -> None:
    import highdicom as hd

    from worker.dicomseg import write_seg

    meta = _meta(tmp_path)
    mask = np.zeros((40, 36, 24), np.uint8, order="F")
    mask[5:15, 5:15, 3:10] = 1
    out = tmp_path / "mask_seg.dcm"
    write_seg(mask, meta, out)
    assert not _dciodvfy_errors(out)
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tumour"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
    assert seg.ContentDescription == "tumour" and seg.SeriesDescription == "segq tumour"
    assert "SpecificCharacterSet" not in seg
    found = _on_grid(seg.get_volume(combine_segments=True), np.asarray(meta.lps_affine), (24, 36, 40))
    np.testing.assert_array_equal(found, mask.transpose(2, 1, 0))
