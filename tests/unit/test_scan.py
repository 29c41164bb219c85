"""Input discovery and output naming: pure path logic."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.scan import collect_inputs
from segq.errors import InputError
from segq.storage import output_path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_directories_files_and_mirrored_subfolders(tmp_path: Path) -> None:
    touch(tmp_path / "scans" / "a.nii.gz")
    touch(tmp_path / "scans" / "sub" / "b.nii")
    touch(tmp_path / "scans" / "notes.txt")
    touch(tmp_path / "scans" / ".hidden.nii.gz")
    single = touch(tmp_path / "c.nii.gz")
    out = tmp_path / "out"
    found = {i.path.name: i.output for i in collect_inputs([tmp_path / "scans", single], out)}
    assert found == {"a.nii.gz": out / "a_seg.nii.gz", "b.nii": out / "sub" / "b_seg.nii.gz",
                     "c.nii.gz": out / "c_seg.nii.gz"}


def test_same_file_twice_is_one_input(tmp_path: Path) -> None:
    f = touch(tmp_path / "a.nii.gz")
    assert len(collect_inputs([f, tmp_path / "." / "a.nii.gz"], tmp_path / "out")) == 1


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: [p / "missing.nii.gz"], "missing.nii.gz does not exist"),
    (lambda p: [touch(p / "scan.txt")], "is neither a .nii or .nii.gz file nor a DICOM file"),
    (lambda p: [(p / "empty").mkdir() or p / "empty"], "holds no .nii or .nii.gz files"),
    (lambda p: [], "no inputs given"),
    (lambda p: [touch(p / "x" / "a.nii.gz"), touch(p / "y" / "a.nii")], "would both write"),
])
def test_refusals_name_the_problem(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(InputError, match=message):
        collect_inputs(make(tmp_path), tmp_path / "out")


@pytest.mark.parametrize("name", ["tab\t.nii.gz", "nul\x00.nii", "csi\x9b.nii.gz"])
def test_control_characters_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="control character"):
        output_path(tmp_path, Path(name))


def test_output_cannot_escape(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot be mapped"):
        output_path(tmp_path, Path("../x.nii.gz"))
