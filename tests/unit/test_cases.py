"""Cases of several files: nnU-Net names grouped into cases, datalists read, and a case's headers checked."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from producer.cases import (
    Case,
    affine_difference,
    case_label,
    channel_columns,
    channel_of,
    check_case,
    group_channels,
    job_case,
    parse_csv_datalist,
    parse_json_datalist,
    read_datalist,
    shown_input,
)
from producer.scan import collect
from segq.errors import InputError

BIG = 1 << 30


def pairs(*names: str, root: Path = Path("/scans")) -> list[tuple[Path, Path]]:
    """(path, relative path) as a directory scan yields them."""
    return [(root / name, Path(name)) for name in names]


def channels(case: str, numbers: range | list[int], suffix: str = ".nii.gz") -> list[str]:
    return [f"{case}_{n:04d}{suffix}" for n in numbers]


@pytest.mark.parametrize(("name", "found"), [
    ("BRATS_001_0000.nii.gz", ("BRATS_001", 0)),
    ("BRATS_001_0003.nii", ("BRATS_001", 3)),
    ("a_b_0012.nii.gz", ("a_b", 12)),
    ("BRATS_001.nii.gz", None),
    ("BRATS_001_000.nii.gz", None),
    ("BRATS_001_00000.nii.gz", None),  # five digits: not a channel
    ("_0000.nii.gz", None),
    ("x_0000.nii.gz.bak", None),
])
def test_channel_of_reads_nnunet_names(name: str, found: tuple[str, int] | None) -> None:
    assert channel_of(name) == found


def test_one_channel_model_keeps_every_file_alone() -> None:
    given = pairs(*channels("BRATS_001", range(4)), "other.nii.gz")
    grouped = group_channels(given, 1)
    assert grouped.singles == given and grouped.cases == [] and grouped.refused == []


def test_cases_group_per_directory_in_channel_order() -> None:
    given = [*pairs(*reversed(channels("a", range(4))), "whole.nii.gz"),
             *pairs(*(f"sub/{n}" for n in channels("a", range(4), ".nii")))]
    grouped = group_channels(given, 4)
    assert grouped.singles == pairs("whole.nii.gz") and grouped.refused == []
    top, sub = sorted(grouped.cases, key=lambda c: str(c.relative))
    assert top.name == sub.name == "a"
    assert top.relative == Path("a") and sub.relative == Path("sub/a")
    assert [f.name for f in top.files] == channels("a", range(4))
    assert [str(f) for f in sub.files] == [f"/scans/sub/{n}" for n in channels("a", range(4), ".nii")]


def test_same_name_in_two_roots_is_two_cases() -> None:
    given = [*pairs(*channels("a", range(2)), root=Path("/one")), *pairs(*channels("a", range(2)), root=Path("/two"))]
    cases = group_channels(given, 2).cases
    assert sorted(str(c.files[0].parent) for c in cases) == ["/one", "/two"]


@pytest.mark.parametrize(("names", "message"), [
    (channels("c", [0, 1, 3]), "channel file /scans/c_0002.nii.gz is missing: the model takes 4 channels, _0000 to "
                               "_0003"),
    (channels("c", range(3), ".nii"), "channel file /scans/c_0003.nii is missing"),
    (channels("c", [1, 2, 3]), "channel file /scans/c_0000.nii.gz is missing"),
    (channels("c", [0, 2]), "channel files /scans/c_0001.nii.gz, /scans/c_0003.nii.gz are missing"),
    (channels("c", range(5)), "/scans/c_0004.nii.gz is one channel too many: the model takes 4 channels"),
    ([*channels("c", range(4)), "c_0001.nii"], "/scans/c_0001.nii and c_0001.nii.gz are one channel"),
])
def test_missing_extra_or_doubled_channels_refuse_the_case(names: list[str], message: str) -> None:
    grouped = group_channels(pairs(*names, "fine.nii.gz"), 4)
    assert grouped.cases == [] and grouped.singles == pairs("fine.nii.gz")
    [refused] = grouped.refused
    assert refused.line().startswith("case c (/scans): ") and message in refused.line(), refused.line()


def test_json_list_of_images_and_names(tmp_path: Path) -> None:
    data = [{"image": ["a/BRATS_7_0000.nii.gz", "a/BRATS_7_0001.nii.gz"]},
            {"image": "/abs/one.nii", "name": "first"},
            {"image": ["b/x.nii.gz", "b/y.nii.gz"], "case": "P2", "label": "b/truth.nii.gz"},
            "c/plain_0000.nii.gz"]
    found = parse_json_datalist(data, tmp_path, "dl.json")
    assert found.refused == [] and found.section is None
    assert [(c.name, c.relative, c.where) for c in found.cases] == [
        ("BRATS_7", Path("BRATS_7"), "dl.json[0]"), ("first", Path("first"), "dl.json[1]"),
        ("P2", Path("P2"), "dl.json[2]"), ("plain", Path("plain"), "dl.json[3]")]
    assert found.cases[0].files == (tmp_path / "a/BRATS_7_0000.nii.gz", tmp_path / "a/BRATS_7_0001.nii.gz")
    assert found.cases[1].files == (Path("/abs/one.nii"),)


@pytest.mark.parametrize(("keys", "used"), [
    (("training", "validation", "testing"), "testing"),
    (("training", "test"), "test"),  # the Medical Segmentation Decathlon's dataset.json: a list of paths
    (("training", "validation"), "validation"),
    (("training",), "training"),
])
def test_json_sections_first_present_wins(tmp_path: Path, keys: tuple[str, ...], used: str) -> None:
    data = {"name": "BraTS", **{key: [{"image": f"{key}.nii.gz", "label": "l.nii.gz"}] for key in keys}}
    found = parse_json_datalist(data, tmp_path, "dataset.json")
    assert found.section == used and [c.name for c in found.cases] == [used]
    assert found.cases[0].where == f"dataset.json {used}[0]"


@pytest.mark.parametrize(("data", "message"), [
    ({"labels": {}}, "has none of the lists 'testing', 'test', 'validation', 'training'"),
    ({"testing": []}, "is not a list of cases"),
    ({"testing": {"image": "x.nii.gz"}}, "is not a list of cases"),
    (42, "is not a list of cases"),
])
def test_json_without_cases_is_refused_whole(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_json_datalist(data, tmp_path, "dl.json")


def test_json_bad_entries_and_duplicate_names_are_refused_alone(tmp_path: Path) -> None:
    data = {"testing": [{"label": "x.nii.gz"}, {"image": []}, {"image": "a.nii.gz", "name": ["x"]},
                        {"image": "s1/p_0000.nii.gz"}, {"image": "s2/p.nii.gz"}, {"image": "ok.nii.gz"}]}
    found = parse_json_datalist(data, tmp_path, "dl.json")
    assert [c.name for c in found.cases] == ["ok"]
    lines = [r.line() for r in found.refused]
    assert lines[:3] == ['datalist entry dl.json testing[0]: has no "image": give a path, or a list of paths (one '
                         'per channel)', 'datalist entry dl.json testing[1]: has no "image": give a path, or a list '
                         'of paths (one per channel)',
                         "datalist entry dl.json testing[2]: its \"name\" ['x'] is not a string"]
    assert lines[3].startswith("case p (dl.json testing[3]): dl.json testing[4] has the same case name")
    assert lines[4].startswith("case p (dl.json testing[4]): dl.json testing[3] has the same case name")


@pytest.mark.parametrize(("header", "columns"), [
    (["case", "image"], [1]),
    (["image_2", "case", "image_0", "image_1"], [2, 3, 0]),
    (["case", "t1", "t1ce", "t2", "flair"], [1, 2, 3, 4]),
    (["t1", "label", "t2"], [0, 2]),
    (["image", "label"], [0]),
])
def test_csv_channel_columns(header: list[str], columns: list[int]) -> None:
    assert channel_columns(header) == columns


def test_csv_numbered_columns_need_every_number() -> None:
    with pytest.raises(InputError, match="image_0, image_2 are not numbered image_0 to image_1"):
        channel_columns(["case", "image_0", "image_2"])


def test_csv_rows_are_cases(tmp_path: Path) -> None:
    text = ("case,t1,t1ce,t2,flair\n"
            "P1,p1/t1.nii.gz,p1/t1ce.nii.gz,p1/t2.nii.gz,/data/p1/flair.nii.gz\n"
            "\n"
            ",q_0000.nii,q_0001.nii,q_0002.nii,q_0003.nii\n"
            "P3,p3/t1.nii.gz,,p3/t2.nii.gz,p3/flair.nii.gz\n"
            "P1,x.nii,y.nii,z.nii,w.nii\n")
    found = parse_csv_datalist(text, tmp_path, "cases.csv")
    assert [c.name for c in found.cases] == ["q"]
    assert found.cases[0].files == tuple(tmp_path / f"q_000{i}.nii" for i in range(4))
    assert found.cases[0].where == "cases.csv line 4"
    lines = sorted(r.line() for r in found.refused)
    assert lines[0].startswith("case P1 (cases.csv line 2): cases.csv line 6 has the same case name")
    assert lines[1].startswith("case P1 (cases.csv line 6): cases.csv line 2 has the same case name")
    assert lines[2] == "case P3 (cases.csv line 5): no file in column t1ce: give every channel"


def test_csv_without_channels_or_rows_is_refused_whole(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="has no channel columns"):
        parse_csv_datalist("case\nP1\n", tmp_path, "c.csv")
    with pytest.raises(InputError, match="has a header row and no cases"):
        parse_csv_datalist("case,image\n\n", tmp_path, "c.csv")


def test_read_datalist_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_datalist(tmp_path / "nope.json")
    (tmp_path / "dl.yaml").write_text("[]")
    with pytest.raises(InputError, match="neither a .json nor a .csv"):
        read_datalist(tmp_path / "dl.yaml")
    (tmp_path / "dl.json").write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        read_datalist(tmp_path / "dl.json")
    (tmp_path / "dl.csv").write_text("\ufeffcase,image\nA,a.nii.gz\n")  # Excel's byte-order mark
    assert read_datalist(tmp_path / "dl.csv").cases == [Case("A", (tmp_path / "a.nii.gz",), Path("A"),
                                                             "dl.csv line 2")]


def write(path: Path, shape: tuple[int, ...] = (6, 5, 4), affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def shifted(by: float) -> np.ndarray:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[0, 3] = by
    return affine


def test_check_case_accepts_one_grid(tmp_path: Path) -> None:
    files = tuple(write(tmp_path / f"c_{i:04d}.nii.gz") for i in range(3))
    assert check_case(files, 3, BIG) is None
    near = write(tmp_path / "near.nii.gz", affine=shifted(5e-5))  # float32 rounding of one grid's origin
    assert check_case((files[0], near), 2, BIG) is None
    assert check_case((write(tmp_path / "one_channel_4d.nii", (6, 5, 4, 1)), files[1]), 2, BIG) is None
    assert check_case((write(tmp_path / "whole.nii.gz", (6, 5, 4, 3)),), 3, BIG) is None


def test_check_case_names_the_file_and_what_differs(tmp_path: Path) -> None:
    first = write(tmp_path / "c_0000.nii.gz")
    moved = write(tmp_path / "moved.nii.gz", affine=shifted(2.5))
    assert check_case((first, moved), 2, BIG) == (
        f"{moved} differs from c_0000.nii.gz in its affine (origin (2.5, 0, 0) mm against (0, 0, 0)): a case's "
        "channels share one grid; resample it onto c_0000.nii.gz")
    spacing = write(tmp_path / "spacing.nii.gz", affine=np.diag([1.0, 1.0, 3.0, 1.0]))
    assert "voxel spacing (1, 1, 3) mm against (1, 1, 2)" in (check_case((first, spacing), 2, BIG) or "")
    flipped = write(tmp_path / "flipped.nii.gz", affine=np.diag([-1.0, 1.0, 2.0, 1.0]))
    assert "orientation of the voxel axes, by up to 2" in (check_case((first, flipped), 2, BIG) or "")
    other = write(tmp_path / "other.nii.gz", (6, 5, 3))
    assert check_case((first, other), 2, BIG) == (
        f"{other} has shape (6, 5, 3) and c_0000.nii.gz (6, 5, 4): a case's channels share one grid; resample it "
        "onto c_0000.nii.gz")
    two = write(tmp_path / "two.nii.gz", (6, 5, 4, 2))
    assert check_case((first, two), 2, BIG) == (
        f"{two} holds 2 channels (shape (6, 5, 4, 2)): a case's channel file holds one; split it into one file per "
        "channel, or pass it alone as the whole case")


def test_check_case_counts_files_against_the_model(tmp_path: Path) -> None:
    files = tuple(write(tmp_path / f"c_{i:04d}.nii.gz") for i in range(3))
    assert check_case(files, 2, BIG) == (f"{files[2]} is one file too many: the case lists 3 files and the model "
                                         "takes 2 channel(s); remove the extra ones, or use a model that takes them")
    assert check_case(files, 4, BIG) == ("the case lists 3 files (c_0000.nii.gz, c_0001.nii.gz, c_0002.nii.gz) and "
                                         "the model takes 4 channels: add the missing channel files, in channel order")
    assert "the volume has 1 channel(s) but the model takes 4" in (check_case(files[:1], 4, BIG) or "")
    assert "above the limit of 300 (SEGQ_MAX_VOXELS)" in (check_case(files, 3, 300) or "")
    broken = tmp_path / "broken_0000.nii.gz"
    broken.write_bytes(b"not a nifti")
    assert "not a readable NIfTI file" in (check_case((broken, files[0]), 2, BIG) or "")


def test_affine_difference_within_tolerance_is_none() -> None:
    assert affine_difference(shifted(0.0), shifted(9e-5)) == ""
    assert affine_difference(shifted(0.0), shifted(2e-4)).startswith("origin (0, 0, 0) mm against (0.0002, 0, 0)")


def test_collect_reads_folder_and_datalist_together(tmp_path: Path) -> None:
    scans, out = tmp_path / "scans", (tmp_path / "out").resolve()
    for name in [*channels("A", range(2)), *channels("sub/B", range(2)), "single.nii.gz", *channels("gap", [1])]:
        write(scans / name)
    data = {"testing": [{"image": [f"scans/A_000{i}.nii.gz" for i in range(2)]},  # the folder's case A again
                        {"image": ["scans/single.nii.gz", "scans/A_0001.nii.gz"], "name": "mixed"},
                        {"image": ["scans/none.nii.gz", "scans/single.nii.gz"], "name": "lost"},
                        {"image": ["scans/notes.txt", "scans/single.nii.gz"], "name": "txt"},
                        {"image": "scans/sub/B_0000.nii.gz", "name": "bad\x1bname"}]}
    (tmp_path / "dl.json").write_text(json.dumps(data))
    found = collect([scans], out, in_channels=2, datalist=tmp_path / "dl.json")
    by_output = {item.output.relative_to(out): item for item in found.inputs}
    assert set(by_output) == {Path("single_seg.nii.gz"), Path("A_seg.nii.gz"), Path("sub/B_seg.nii.gz")}
    case = by_output[Path("sub/B_seg.nii.gz")]
    assert case.path == case.channels[0] and [p.name for p in case.channels] == ["B_0000.nii.gz", "B_0001.nii.gz"]
    assert all(p.is_absolute() for p in case.channels) and case.case is not None
    assert by_output[Path("single_seg.nii.gz")].channels == () and by_output[Path("single_seg.nii.gz")].case is None
    lines = sorted(r.line() for r in found.refused)
    assert len(lines) == 5, lines
    assert lines[0] == ("case bad\x1bname (dl.json testing[4]): its output name bad\\x1bname holds control "
                        "characters (\\x1b)")
    assert lines[1].startswith(f"case gap ({scans}): channel file {scans}/gap_0000.nii.gz is missing")
    assert lines[2] == f"case lost (dl.json testing[2]): {tmp_path}/scans/none.nii.gz does not exist"
    assert lines[3] == (f"case mixed (dl.json testing[1]): {(scans / 'single.nii.gz').resolve()} is already an "
                        f"input of {out}/single_seg.nii.gz: a file belongs to one case")
    assert lines[4] == f"case txt (dl.json testing[3]): {tmp_path}/scans/notes.txt is not a .nii or .nii.gz file"


def test_collect_datalist_alone_and_dicom_seg_refusal(tmp_path: Path) -> None:
    files = [write(tmp_path / "data" / f"p_{i:04d}.nii.gz") for i in range(2)]
    (tmp_path / "cases.csv").write_text("case,image_0,image_1\n" + f"P,{files[0]},data/p_0001.nii.gz\n")
    out = (tmp_path / "out").resolve()
    [item] = collect([], out, datalist=tmp_path / "cases.csv").inputs
    assert item.output == out / "P_seg.nii.gz" and item.channels == tuple(f.resolve() for f in files)
    refused = collect([], out, "dicom-seg", datalist=tmp_path / "cases.csv").refused
    assert [r.line() for r in refused] == ["case P (cases.csv line 2): a NIfTI case has no DICOM series to "
                                           "reference: --output-format dicom-seg needs DICOM input"]
    with pytest.raises(InputError, match="or --datalist FILE"):
        collect([], out)


def test_a_job_of_several_files_is_named_by_its_case() -> None:
    files = [f"/scans/sub/BRATS_001_000{i}.nii.gz" for i in range(4)]
    assert job_case("/out/sub/BRATS_001_seg.nii.gz", files) == "BRATS_001"
    assert job_case("/out/sub/BRATS_001_seg.nii.gz", None) is None, "one file: no case"
    assert job_case("/out/odd.dcm", files) == "BRATS_001", "an output not named _seg.nii.gz: the first file's case"
    assert case_label("P1", 2) == "P1 (2 files)"
    assert shown_input(files[0], "/out/sub/BRATS_001_seg.nii.gz", files) == "BRATS_001 (4 files)"
    assert shown_input("/scans/a.nii.gz", "/out/a_seg.nii.gz", None) == "a.nii.gz"
    assert shown_input("/scans/x_0000.nii.gz", "/out/x_0000_seg.nii.gz", []) == "x_0000.nii.gz"
