"""Path attacks (issue 6, scenario 12): `..`, symlinks out of SEGQ_ALLOWED_ROOTS, odd names, swapped dirs.

Each is refused with a message that names the path and what to do; the producer's and the worker's
checks are both exercised (the worker re-checks just before it reads or writes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from producer.scan import collect_inputs
from segq.errors import InputError
from segq.storage import output_path, require_allowed, require_output_inside
from tests.helpers import environment


def _volume(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture
def roots(tmp_path: Path) -> Iterator[Path]:
    """An allowed root holding scans/ and out/, and a sibling directory outside it."""
    root = tmp_path / "allowed"
    _volume(root / "scans" / "a.nii.gz")
    _volume(tmp_path / "outside" / "secret.nii.gz")
    (root / "out").mkdir()
    with environment({"SEGQ_ALLOWED_ROOTS": f"{root}{os.pathsep}{tmp_path / 'also'}"}):
        yield root


def test_inside_the_roots_is_accepted(roots: Path) -> None:
    [item] = collect_inputs([roots / "scans"], roots / "out")
    assert item.path == roots / "scans" / "a.nii.gz" and item.output == roots / "out" / "a_seg.nii.gz"


def test_input_with_dotdot_out_of_the_roots_is_refused(roots: Path) -> None:
    sneaky = roots / "scans" / ".." / ".." / "outside" / "secret.nii.gz"
    with pytest.raises(InputError, match=r"outside the allowed roots .*SEGQ_ALLOWED_ROOTS"):
        collect_inputs([sneaky], roots / "out")


def test_out_dir_with_dotdot_out_of_the_roots_is_refused(roots: Path) -> None:
    with pytest.raises(InputError, match="output directory .* outside the allowed roots"):
        collect_inputs([roots / "scans"], roots / "out" / ".." / ".." / "elsewhere")


def test_symlinked_file_out_of_the_roots_is_refused(roots: Path) -> None:
    (roots / "scans" / "link.nii.gz").symlink_to(roots.parent / "outside" / "secret.nii.gz")
    with pytest.raises(InputError, match="link.nii.gz resolves to .*secret.nii.gz, outside the allowed roots"):
        collect_inputs([roots / "scans"], roots / "out")


def test_symlinked_directory_out_of_the_roots_is_refused_not_skipped(roots: Path) -> None:
    (roots / "scans" / "more").symlink_to(roots.parent / "outside", target_is_directory=True)
    with pytest.raises(InputError, match="outside the allowed roots"):
        collect_inputs([roots / "scans"], roots / "out")


def test_symlink_loop_ends(roots: Path) -> None:
    (roots / "scans" / "loop").symlink_to(roots / "scans", target_is_directory=True)
    found = collect_inputs([roots / "scans"], roots / "out")
    assert {item.path for item in found} == {roots / "scans" / "a.nii.gz"}


def test_out_dir_symlinked_out_of_the_roots_is_refused(roots: Path) -> None:
    (roots / "out2").symlink_to(roots.parent / "outside", target_is_directory=True)
    with pytest.raises(InputError, match="outside the allowed roots"):
        collect_inputs([roots / "scans"], roots / "out2")


@pytest.mark.parametrize("name", ["a b.nii.gz", "x;rm -rf.nii.gz", "quote'.nii.gz", "caf\u00e9.nii.gz",
                                  "$(id).nii.gz"])
def test_odd_names_land_inside_the_output_directory(roots: Path, name: str) -> None:
    """The filesystem allows them and none can escape --out (issue 24, item 3): accepted, output beside the rest."""
    _volume(roots / "scans" / name)
    found = {item.path.name: item.output for item in collect_inputs([roots / "scans"], roots / "out")}
    assert found[name].parent == roots / "out" and found[name].name.endswith("_seg.nii.gz")


@pytest.mark.parametrize("name", ["new\nline.nii.gz", "tab\t.nii.gz", "esc\x1b[2J.nii.gz"])
def test_control_characters_in_names_are_refused(roots: Path, name: str) -> None:
    _volume(roots / "scans" / name)
    with pytest.raises(InputError, match="control character"):
        collect_inputs([roots / "scans"], roots / "out")


def test_control_characters_in_the_output_directory_are_refused(roots: Path) -> None:
    with pytest.raises(InputError, match="control characters"):
        collect_inputs([roots / "scans"], roots / "out\nINFO fake log line")


def test_dotdot_in_a_relative_input_name_cannot_escape(tmp_path: Path) -> None:
    for bad in (Path("../x.nii.gz"), Path("a/../../x.nii.gz"), Path(".")):
        with pytest.raises(InputError, match="cannot be mapped inside"):
            output_path(tmp_path / "out", bad)


def test_no_roots_means_anywhere(tmp_path: Path) -> None:
    with environment({"SEGQ_ALLOWED_ROOTS": ""}):
        assert require_allowed(tmp_path / "x" / ".." / "y", [], "input") == tmp_path / "y"


def test_worker_refuses_an_output_swapped_for_a_symlink_after_submit(tmp_path: Path) -> None:
    """Submit checked out/sub; then out/sub became a symlink to another directory: the worker refuses."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    target = out / "sub" / "a_seg.nii.gz"
    require_output_inside(target, out, [])
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InputError, match="a directory on the way is a symlink out of the output directory"):
        require_output_inside(target, out, [])


def test_worker_refuses_a_tampered_output_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for bad in (tmp_path / "elsewhere" / "a_seg.nii.gz", out / ".." / "a_seg.nii.gz", out / "a\x1bb_seg.nii.gz"):
        with pytest.raises(InputError, match="not inside its dataset's output directory|could escape"):
            require_output_inside(bad, out, [])
    with pytest.raises(InputError, match="outside the allowed roots"):
        require_output_inside(out / "a_seg.nii.gz", out, [tmp_path / "allowed"])
