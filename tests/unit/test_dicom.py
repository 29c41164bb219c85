"""DICOM reading without services: geometry against a known NIfTI grid, and hostile files refused one line each."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from segq.dicom import check_volume, find_series, is_dicom, load_series, series_sha256
from segq.errors import InputError
from segq.modelspec import ModelSpec, parse_code
from tests.dicom_helpers import (
    oblique_affine,
    write_enhanced,
    write_localizer,
    write_series,
    write_truncated,
    write_undecodable,
)

SHAPE = (20, 24, 12)


def _data(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.round(rng.normal(0, 100, SHAPE) * 2) / 2).astype(np.float32)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("modality,degrees", [("CT", 20.0), ("MR", -35.0), ("CT", 0.0)])
def test_series_loads_as_the_nifti_grid(tmp_path: Path, modality: str, degrees: float) -> None:
    """Shuffled, oblique, non-unit spacing, rescaled: the voxels and the RAS affine of the NIfTI it came from."""
    data, affine = _data(), oblique_affine(degrees=degrees)
    write_series(tmp_path, data, affine, modality=modality, names="x{k}")  # no suffix: found by content
    [series], refused = find_series(_files(tmp_path))
    assert not refused and series.modality == modality and series.shape == SHAPE
    np.testing.assert_allclose(series.spacing, (0.8, 1.1, 2.5), atol=1e-6)
    loaded = load_series(list(series.files))
    np.testing.assert_array_equal(loaded.volume, data)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-6)


def test_enhanced_multiframe_loads_like_its_single_frames(tmp_path: Path) -> None:
    data, affine = _data(1), oblique_affine()
    slices = write_series(tmp_path / "single", data, affine)
    write_enhanced(tmp_path / "enhanced" / "ct.dcm", slices)
    [series], refused = find_series(_files(tmp_path / "enhanced"))
    assert not refused and series.shape == SHAPE
    loaded = load_series(list(series.files))
    np.testing.assert_array_equal(loaded.volume, data)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-4)


def test_hostile_files_are_refused_alone_with_one_line_each(tmp_path: Path) -> None:
    data, affine = _data(2), oblique_affine()
    good = write_series(tmp_path / "good", data, affine)
    write_series(tmp_path / "missing", data, affine, skip=(5,))
    write_series(tmp_path / "duplicate", data, affine, duplicate=(3,))
    scout = write_series(tmp_path / "scouted", data, affine)
    write_localizer(tmp_path / "scouted" / "scout.dcm", scout[0])
    (tmp_path / "bad").mkdir()
    write_truncated(tmp_path / "bad" / "cut.dcm", good[0])
    write_undecodable(tmp_path / "bad" / "video.dcm", good[1])
    (tmp_path / "bad" / "text.dcm").write_text("not dicom")
    found, refused = find_series(_files(tmp_path))
    assert [s.files[0].parent.name for s in found] == ["good"]
    lines = sorted(r.line() for r in refused)
    assert len(lines) == 6 and all("\n" not in line for line in lines)
    expected = {"missing": "missing slices", "duplicate": "duplicated slices", "scouted": "mixed orientations",
                "cut.dcm": "truncated", "video.dcm": "no installed decoder", "text.dcm": "not a DICOM file"}
    for what, reason in expected.items():
        assert sum(what in line and reason in line for line in lines) == 1, (what, lines)


def test_mixed_sizes_in_one_series_are_refused(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    write_series(tmp_path, _data(), oblique_affine(), series_uid=uid, names="a{k:03d}.dcm")
    write_series(tmp_path, _data()[:10, :12], oblique_affine(), series_uid=uid, names="b{k:03d}.dcm")
    found, [refused] = find_series(_files(tmp_path))
    assert not found and refused.line().startswith(f"series {uid} (") and "mixed image sizes" in refused.reason


def test_mixed_series_in_one_folder_are_two_volumes(tmp_path: Path) -> None:
    write_series(tmp_path, _data(3), oblique_affine(), names="a{k:03d}.dcm")
    write_series(tmp_path, _data(4)[:, :, :10], oblique_affine(degrees=5), names="b{k:03d}.dcm")
    found, refused = find_series(_files(tmp_path))
    assert not refused and sorted(s.shape[2] for s in found) == [10, 12]


def test_real_single_slices_are_refused_and_thin_series_too(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm"):
        shutil.copy(str(get_testdata_file(name, download=False)), tmp_path / name)
    found, refused = find_series(_files(tmp_path))
    lines = sorted(r.line() for r in refused)
    assert not found and len(lines) == 3
    assert sum("a single slice, not a volume" in line for line in lines) == 2
    assert any("MR_truncated.dcm" in line and "truncated" in line for line in lines)
    write_series(tmp_path / "thin", _data()[:, :, :5], oblique_affine())
    [thin], _ = find_series(_files(tmp_path / "thin"))
    assert "too thin for the model" in (check_volume(thin, 96, 10**9) or "")
    assert check_volume(thin, 16, 10**9) is None
    assert "SEGQ_MAX_VOXELS" in (check_volume(thin, 16, 100) or "")


def test_identity_is_content_not_names(tmp_path: Path) -> None:
    files = write_series(tmp_path / "a", _data(), oblique_affine(), shuffle=False)
    copies = []
    for i, f in enumerate(reversed(files)):
        copies.append(tmp_path / "b" / f"other{i}")
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(f, copies[-1])
    assert series_sha256(files) == series_sha256(copies) and is_dicom(copies[0]) and not is_dicom(tmp_path)


def test_segment_codes_come_from_the_model_file(tmp_path: Path) -> None:
    assert parse_code("Neoplasm") == ("108369006", "SCT", "Neoplasm")
    assert parse_code("SCT:10200004:Liver") == ("10200004", "SCT", "Liver")
    spec = ModelSpec("UNet", 1, 2, 32, 1, tmp_path / "m.pt", segment_type="NoSuchThing")
    with pytest.raises(InputError, match="segment_type"):
        spec.validate()


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless"])
def test_compressed_series_decode_to_the_same_voxels(tmp_path: Path, syntax: str) -> None:
    """RLE (pydicom's own codec) and JPEG-LS (pyjpegls, a highdicom dependency), slice by slice."""
    import pydicom
    import pydicom.uid

    data = _data(6)
    files = write_series(tmp_path, data, oblique_affine())
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(getattr(pydicom.uid, syntax))
        ds.save_as(path)
    [series], refused = find_series(files)
    assert not refused
    np.testing.assert_array_equal(load_series(list(series.files)).volume, data)


def test_the_dicom_extra_decodes_jpeg2000(tmp_path: Path) -> None:
    """pydicom's real JPEG 2000 scan passes the decoder check (pylibjpeg-openjpeg, from segq[dicom]):
    it is refused only for being one slice."""
    from pydicom.data import get_testdata_file

    shutil.copy(str(get_testdata_file("MR_small_jp2klossless.dcm", download=False)), tmp_path / "j2k.dcm")
    _, [refused] = find_series([tmp_path / "j2k.dcm"])
    assert "a single slice" in refused.reason, refused.line()
