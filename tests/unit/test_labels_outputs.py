"""Label maps through results, evaluate and the report, on rows and arrays built in memory (no services)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from producer.evaluate import LabelScore, find_truth, label_counts, score_job, tally, with_label_dice
from producer.report import (
    LABEL_ALPHA,
    LABEL_COLOURS,
    WorkerStats,
    build_html,
    label_colour,
    label_rgba,
    legend_html,
    overlay_png,
)
from producer.results import (
    COLUMNS,
    TABLE_COLUMNS,
    column_key,
    input_shown,
    label_columns,
    label_names,
    rows,
    table_columns,
    to_csv,
    to_json,
)
from segq.errors import InputError
from segq.models import Dataset, Job, Status
from segq.modelspec import ModelSpec

NAMES = {0: "background", 1: "spleen", 2: "Left Kidney", 3: "liver & <b>vessels</b>"}


def model(labels: dict[int, str] | None) -> dict[str, Any]:
    """A dataset's recorded model: a bundle with these labels, or (None) a model.toml's binary mask."""
    if labels is None:
        return ModelSpec("UNet", 1, 2, 32, 1, Path("/m/model.pt")).to_dict()
    return ModelSpec("bundle", 1, len(labels), 32, 0, Path("/m/model.pt"), format="bundle",
                     labels={str(k): v for k, v in labels.items()}).to_dict()


def done_job(name: str, labels: list[dict[str, Any]] | None, **fields: Any) -> Job:
    return Job(id=name, input_path=f"/scans/{name}.nii.gz", output_path=f"/out/{name}_seg.nii.gz",
               status=Status.DONE, labels=labels, **fields)


def entries(*counts: tuple[int, str, int]) -> list[dict[str, Any]]:
    return [{"value": v, "name": n, "voxels": c, "ml": round(c * 0.002, 4)} for v, n, c in counts]


def dataset(ds_id: str, labels: dict[int, str] | None, jobs: list[Job]) -> Dataset:
    return Dataset(id=ds_id, name=ds_id, out_dir="/out", model_path="/m", model_sha256="a" * 64,
                   params={"model": model(labels)}, jobs=jobs)


def bundle_dataset() -> Dataset:
    return dataset("multi", NAMES, [
        done_job("a", entries((1, "spleen", 8), (2, "Left Kidney", 6), (3, "liver & <b>vessels</b>", 0)),
                 tumour_voxels=14, tumour_ml=0.028),
        Job(id="b", input_path="/scans/b.nii.gz", output_path="/out/b_seg.nii.gz", status=Status.FAILED,
            error="NaN or infinite values"),
    ])


def binary_dataset() -> Dataset:
    # the worker records a binary job's one label too; its rows must not change for it
    return dataset("binary", None, [done_job("t", entries((1, "tumour", 5)), tumour_voxels=5, tumour_ml=0.01)])


@pytest.mark.parametrize(("name", "key"), [
    ("spleen", "spleen"), ("Left Kidney", "left_kidney"), ("liver & <b>vessels</b>", "liver_b_vessels_b"),
    ("=HYPERLINK(\"x\")", "hyperlink_x"), ("-1+2", "1_2"), ("rein gauche é", "rein_gauche_é"), ("***", ""),
])
def test_column_keys_are_safe_column_names(name: str, key: str) -> None:
    assert column_key(name) == key


def test_label_columns_dodge_taken_names_and_empty_keys() -> None:
    ds = dataset("d", {0: "background", 1: "tumour", 2: "Liver", 3: "liver", 4: "***"}, [])
    assert [c.key for c in label_columns([ds])] == ["tumour_1", "liver", "liver_3", "label_4"]
    assert label_columns([ds])[0].columns == ["tumour_1_voxels", "tumour_1_ml", "tumour_1_dice"]


def test_a_binary_dataset_has_no_label_names_and_todays_columns() -> None:
    ds = binary_dataset()
    assert label_names(ds) is None
    assert label_names(Dataset(id="x", name="x", out_dir="/", model_path="/", model_sha256="", params={},
                               jobs=[])) is None, "a dataset recorded without its model is binary"
    data = rows([ds])
    assert set(data[0]) == set(COLUMNS), "job_row's keys, nothing added"
    header = to_csv(data).splitlines()[0]
    assert header == ",".join(COLUMNS)
    assert table_columns(data, [ds]) == TABLE_COLUMNS


def test_label_map_rows_carry_each_labels_voxels_ml_and_dice() -> None:
    ds = bundle_dataset()
    assert label_names(ds) == {1: "spleen", 2: "Left Kidney", 3: "liver & <b>vessels</b>"}
    data = rows([ds])
    parsed = list(csv.DictReader(io.StringIO(to_csv(data))))
    header = to_csv(data).splitlines()[0].split(",")
    assert header[:len(COLUMNS)] == COLUMNS
    assert header[len(COLUMNS):] == [f"{key}_{field}" for key in ("spleen", "left_kidney", "liver_b_vessels_b")
                                     for field in ("voxels", "ml", "dice")]
    assert parsed[0]["spleen_voxels"] == "8" and parsed[0]["spleen_ml"] == "0.016" and parsed[0]["spleen_dice"] == ""
    assert parsed[0]["liver_b_vessels_b_voxels"] == "0" and parsed[1]["spleen_voxels"] == ""  # failed: no labels
    as_json = json.loads(to_json(data))
    assert as_json[0]["left_kidney_voxels"] == 6 and as_json[1]["left_kidney_voxels"] is None
    assert table_columns(data, [ds]) == TABLE_COLUMNS + ["spleen_ml", "left_kidney_ml", "liver_b_vessels_b_ml"]


def test_mixed_datasets_give_every_row_the_label_columns() -> None:
    data = rows([bundle_dataset(), binary_dataset()])
    assert len({tuple(row) for row in data}) == 1, "one shape of row"
    binary_row = next(row for row in data if row["job"] == "t")
    assert binary_row["spleen_voxels"] is None and binary_row["tumour_voxels"] == 5


def test_stored_label_dice_shows_in_the_table() -> None:
    ds = bundle_dataset()
    ds.jobs[0].labels = with_label_dice(ds.jobs[0].labels, (LabelScore(1, "spleen", 0.5),
                                                            LabelScore(2, "Left Kidney", 1.0),
                                                            LabelScore(3, "liver & <b>vessels</b>", None)))
    data = rows([ds])
    assert data[0]["spleen_dice"] == 0.5 and data[0]["liver_b_vessels_b_dice"] is None
    assert "spleen_dice" in table_columns(data, [ds]) and "liver_b_vessels_b_dice" in table_columns(data, [ds])


def test_with_label_dice_adds_dice_to_each_entry_and_keeps_the_rest() -> None:
    before = entries((1, "spleen", 8), (3, "liver", 0))
    after = with_label_dice(before, (LabelScore(1, "spleen", 0.5), LabelScore(2, "kidney", 0.0)))
    assert after == [{**before[0], "dice": 0.5}, {"value": 2, "name": "kidney", "dice": 0.0}, before[1]]
    assert "dice" not in before[0], "new dicts: a JSON column changes only when assigned"


def test_label_dice_known_answers() -> None:
    pred, truth = np.zeros((6, 6, 4), np.uint8), np.zeros((6, 6, 4), np.int16)
    pred[0:2, 0:2, 0:2] = 1
    truth[1:3, 0:2, 0:2] = 1  # 8 voxels each, 4 shared: 0.5
    pred[3:5, 3:6, 0] = truth[3:5, 3:6, 0] = 2  # 1.0
    pred[5, 0, 3] = 4  # only in the mask: 0.0
    counts = tally(pred, truth, "t.nii.gz")
    assert [counts.dice(v) for v in (1, 2, 3, 4)] == [0.5, 1.0, None, 0.0]
    assert counts.present(counts.pred) == {1, 2, 4} and counts.present(counts.truth) == {1, 2}


def test_a_truth_that_is_not_a_label_map_is_refused_by_name() -> None:
    with pytest.raises(InputError, match="ground truth t.nii.gz holds fractional values"):
        label_counts(np.array([0.0, 0.5]), "ground truth t.nii.gz")
    with pytest.raises(InputError, match="holds negative values"):
        label_counts(np.array([0, -3]), "ground truth t.nii.gz")
    assert list(label_counts(np.array([0.0, 2.0, 2.0]), "t")) == [1, 0, 2], "whole floats are labels"


def test_label_colours_are_tab20_strong_colours_first() -> None:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab20 = [to_hex(c) for c in colormaps["tab20"].colors]  # type: ignore[attr-defined]
    assert list(LABEL_COLOURS) == tab20[0::2] + tab20[1::2]
    assert label_colour(1) == "#1f77b4" and label_colour(21) == label_colour(1)


def test_label_rgba_leaves_the_background_transparent() -> None:
    rgba = label_rgba(np.array([[0, 1], [2, 21]]))
    assert rgba[0, 0].tolist() == [0, 0, 0, 0]
    assert np.allclose(rgba[0, 1], [0x1F / 255, 0x77 / 255, 0xB4 / 255, LABEL_ALPHA])
    assert np.allclose(rgba[1, 0, :3], [0xFF / 255, 0x7F / 255, 0x0E / 255])
    assert np.array_equal(rgba[1, 1], rgba[0, 1]), "label 21 cycles back to label 1's colour"


def test_legend_escapes_names_beside_their_colours() -> None:
    legend = legend_html(NAMES)
    assert ">background<" not in legend and "<b>" not in legend
    items = re.findall(r'<li><span class="swatch" style="background:(#[0-9a-f]{6})"></span>([^<]*)</li>', legend)
    assert items == [("#1f77b4", "spleen"), ("#ff7f0e", "Left Kidney"),
                     ("#2ca02c", "liver &amp; &lt;b&gt;vessels&lt;/b&gt;")]


def test_page_of_a_label_map_has_legends_and_a_label_table_and_binary_has_neither() -> None:
    pixel = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    page = build_html([bundle_dataset()], [WorkerStats("gpu0@box", 1, 4, 1.0)], {"a": pixel})
    assert page.count('<ul class="legend">') == 2, "one beside the label table, one above the mid-slices"
    assert '<table class="labels" id="labels-multi">' in page and "<b>vessels" not in page
    table = page.split('<table class="labels"')[1].split("</table>")[0]
    assert re.findall(r"</span>([^<]+)</td><td>(\d+)</td><td>([^<]+)</td><td>([^<]*)</td>", table) == [
        ("spleen", "1", "1 of 1", "0.016"), ("Left Kidney", "2", "1 of 1", "0.012"),
        ("liver &amp; &lt;b&gt;vessels&lt;/b&gt;", "3", "0 of 1", "0")]
    binary = build_html([binary_dataset()], [], {"t": pixel})
    assert 'class="legend"' not in binary and "<h2>Labels</h2>" not in binary
    assert "</tbody></table>\n<h2>Mid-slices with the mask</h2>\n<div class=\"gallery\">" in binary


def _png_pixels(uri: str) -> np.ndarray:
    from matplotlib import image

    return image.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")[..., :3]


def test_overlay_colours_each_label(tmp_path: Path) -> None:
    image = np.zeros((40, 40, 6), np.float32)  # black: a label's pixel is its colour times its alpha
    labels = np.zeros(image.shape, np.uint8)
    labels[2:18, 2:38, 1:5], labels[22:38, 2:38, 1:5] = 1, 3
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "in.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "seg.nii.gz"))
    pixels = _png_pixels(overlay_png(tmp_path / "in.nii.gz", tmp_path / "seg.nii.gz", labels=True)).reshape(-1, 3)
    for value in (1, 3):
        colour = np.array([int(label_colour(value)[i:i + 2], 16) / 255 for i in (1, 3, 5)]) * LABEL_ALPHA
        assert (np.abs(pixels - colour).max(axis=1) < 0.02).sum() > 500, value
    binary = _png_pixels(overlay_png(tmp_path / "in.nii.gz", tmp_path / "seg.nii.gz")).reshape(-1, 3)
    blue = np.array([0x1f, 0x77, 0xb4]) / 255 * LABEL_ALPHA
    assert (np.abs(binary - blue).max(axis=1) < 0.02).sum() == 0, "a binary mask keeps its one red-yellow overlay"


def case_job(tmp_path: Path, name: str = "BRATS_001", channels: int = 4) -> Job:
    """A done job of an nnU-Net case of ``channels`` files, its label map written under tmp_path/out."""
    files = [str(tmp_path / "scans" / f"{name}_{i:04d}.nii.gz") for i in range(channels)]
    output = tmp_path / "out" / f"{name}_seg.nii.gz"
    output.parent.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((6, 6, 4), np.uint8)
    labels[0:2, 0:2, 0:2], labels[3:5, 3:6, 0] = 1, 2
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(output))
    return Job(id=name, input_path=files[0], output_path=str(output), status=Status.DONE, channel_files=files,
               labels=entries((1, "spleen", 8), (2, "Left Kidney", 6)), tumour_voxels=14, tumour_ml=0.028)


def test_a_cases_truth_is_found_by_its_name_then_by_its_first_file(tmp_path: Path) -> None:
    job, truth_dir = case_job(tmp_path), tmp_path / "labelsTs"
    truth_dir.mkdir()
    truth = np.asarray(nib.load(job.output_path).dataobj).copy()
    truth[0:2, 0:2, 0:2] = 0
    truth[1:3, 0:2, 0:2] = 1  # 8 voxels each, 4 shared: 0.5
    nib.save(nib.Nifti1Image(truth.astype(np.int16), np.eye(4)), str(truth_dir / "BRATS_001_0000.nii.gz"))
    assert find_truth(truth_dir, Path(job.input_path), "BRATS_001") == truth_dir / "BRATS_001_0000.nii.gz"
    assert score_job(job, truth_dir, {1: "spleen", 2: "Left Kidney"}).dice == 0.75, "the first file's name, as before"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(job.output_path).dataobj).astype(np.int16), np.eye(4)),
             str(truth_dir / "BRATS_001.nii.gz"))  # nnU-Net's labelsTr name: the case's
    assert find_truth(truth_dir, Path(job.input_path), "BRATS_001") == truth_dir / "BRATS_001.nii.gz"
    score = score_job(job, truth_dir, {1: "spleen", 2: "Left Kidney"})
    assert score.dice == 1.0 and [s.dice for s in score.labels] == [1.0, 1.0]
    one_file = Job(id="x", input_path=job.input_path, output_path=job.output_path, status=Status.DONE)
    assert score_job(one_file, truth_dir).dice == round(2 * 10 / (14 + 14), 4), "one file: its own name only"


def test_a_case_of_several_files_is_shown_by_its_name(tmp_path: Path) -> None:
    ds = dataset("cases", NAMES, [case_job(tmp_path), case_job(tmp_path, "-1+2", 2), *bundle_dataset().jobs[:1]])
    data = rows([ds])
    assert [input_shown(row) for row in data] == ["BRATS_001 (4 files)", "-1+2 (2 files)", "a.nii.gz"]
    assert data[0]["input"] == str(tmp_path / "scans" / "BRATS_001_0000.nii.gz"), "input: the first file, as before"
    header = to_csv(data).splitlines()[0].split(",")
    assert header[:len(COLUMNS) + 2] == [*COLUMNS, "case", "channel_files"], "the case columns, then the labels'"
    assert header[len(COLUMNS) + 2] == "spleen_voxels"
    parsed = list(csv.DictReader(io.StringIO(to_csv(data))))
    assert parsed[0]["case"] == "BRATS_001" and parsed[0]["channel_files"].split(";") == data[0]["channel_files"]
    assert parsed[1]["case"] == "'-1+2", "a case name a spreadsheet would run is written as text"
    assert parsed[2]["case"] == "" and parsed[2]["channel_files"] == ""
    as_json = json.loads(to_json(data))
    assert as_json[0]["case"] == "BRATS_001" and len(as_json[0]["channel_files"]) == 4
    assert as_json[1]["case"] == "-1+2" and as_json[2]["case"] is None and as_json[2]["channel_files"] is None
    assert table_columns(data, [ds])[0] == "input"
    page = build_html([ds], [], {"BRATS_001": None})
    assert "<td>BRATS_001 (4 files)</td>" in page and "<td>a.nii.gz</td>" in page
    assert "<figcaption>BRATS_001 (4 files): 0.028 mL</figcaption>" in page
    assert set(rows([binary_dataset()])[0]) == set(COLUMNS), "no case in the results: no case columns"
