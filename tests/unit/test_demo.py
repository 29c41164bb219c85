"""Synthetic demo data, the Dice/volume metrics and the z-score normalisation (pure numpy, fast)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import voxel_sizes

from segq.demo import IMAGES_DIR, SLICE_MM, TRUTH_DIR, make_volume, write_demo_dataset
from segq.metrics import dice, volume_error_ml
from segq.preprocess import zscore_nonzero

SMALL = (48, 48, 32)


@pytest.fixture(scope="module")
def volumes() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [make_volume(rng, SMALL) for _ in range(4)]


def test_volume_shapes_and_dtypes(volumes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    for image, mask, affine in volumes:
        assert image.shape == SMALL and image.dtype == np.float32
        assert mask.shape == SMALL and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 1}
        assert affine.shape == (4, 4) and np.isfinite(image).all()


def test_affine_has_anisotropic_spacing(volumes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    for _, _, affine in volumes:
        spacing = voxel_sizes(affine)
        assert spacing[0] == pytest.approx(spacing[1])
        assert 0.8 <= spacing[0] <= 1.2
        assert SLICE_MM[0] <= spacing[2] <= SLICE_MM[1]
        assert abs(np.linalg.det(affine[:3, :3])) == pytest.approx(float(np.prod(spacing)))


def _grow(region: np.ndarray) -> np.ndarray:
    """``region`` plus its 6-connected neighbours."""
    grown = region.copy()
    for axis in range(region.ndim):
        for step in (1, -1):
            shifted = np.roll(region, step, axis=axis)
            edge: list[slice | int] = [slice(None)] * region.ndim
            edge[axis] = 0 if step == 1 else -1
            shifted[tuple(edge)] = False  # no wrap-around
            grown |= shifted
    return grown


def _outside(dark: np.ndarray) -> np.ndarray:
    """Dark voxels connected to the volume's border: the air around the head."""
    border = np.zeros_like(dark)
    border[[0, -1]] = border[:, [0, -1]] = border[:, :, [0, -1]] = True
    region = dark & border
    while True:
        grown = _grow(region) & dark
        if (grown == region).all():
            return region
        region = grown


def test_lesions_are_non_empty_bright_and_inside_tissue(
        volumes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    for image, mask, _ in volumes:
        lesion = mask.astype(bool)
        assert lesion.sum() > 20
        air = _outside(image < 0.15 * np.median(image[lesion]))
        assert air.mean() > 0.3  # the head does not fill the field of view
        assert not (_grow(lesion) & air).any()  # lesions are wrapped in tissue
        tissue = ~air & ~lesion
        assert np.median(image[lesion]) > 1.2 * np.median(image[tissue])


def test_same_seed_same_volume() -> None:
    first = make_volume(np.random.default_rng(7), SMALL)
    second = make_volume(np.random.default_rng(7), SMALL)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_make_volume_rejects_tiny_shapes() -> None:
    with pytest.raises(ValueError, match="every side"):
        make_volume(np.random.default_rng(0), (16, 48, 48))


def test_write_demo_dataset_layout(tmp_path: Path) -> None:
    pairs = write_demo_dataset(tmp_path, count=2, seed=5, shape=SMALL)
    assert [p.name for p, _ in pairs] == ["case_000.nii.gz", "case_001.nii.gz"]
    assert sorted(p.name for p in (tmp_path / IMAGES_DIR).iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    for image_path, mask_path in pairs:
        assert mask_path.parent == tmp_path / TRUTH_DIR and mask_path.name == image_path.name
        image, mask = nib.load(image_path), nib.load(mask_path)
        assert image.shape == SMALL and mask.shape == SMALL
        np.testing.assert_allclose(image.affine, mask.affine)
        assert image.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}


def test_write_demo_dataset_rejects_zero_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="count"):
        write_demo_dataset(tmp_path, count=0)


def test_dice_known_answers() -> None:
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    b = np.zeros_like(a)
    assert dice(a, b) == 1.0  # both empty
    a[:2] = 1
    assert dice(a, a) == 1.0
    b[2:] = 1
    assert dice(a, b) == 0.0
    c = np.zeros_like(a)
    c[1:3] = 1  # half of a, half outside: 2 * 16 / (32 + 32)
    assert dice(a, c) == pytest.approx(0.5)
    d = np.zeros_like(a)
    d[:1] = 1  # 2 * 16 / (32 + 16)
    assert dice(a, d) == pytest.approx(2 / 3)


def test_dice_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_volume_error_ml_known_answer() -> None:
    truth = np.zeros((10, 10, 10), dtype=np.uint8)
    truth[:5] = 1  # 500 voxels
    pred = np.zeros_like(truth)
    pred[:6] = 1  # 600 voxels
    assert volume_error_ml(pred, truth, (1.0, 1.0, 2.0)) == pytest.approx(100 * 2.0 / 1000)
    assert volume_error_ml(truth, pred, (1.0, 1.0, 2.0)) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="spacing"):
        volume_error_ml(pred, truth, (1.0, 1.0))


def test_zscore_nonzero_known_answer() -> None:
    volume = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float64)  # nonzero: mean 2, std sqrt(2/3)
    std = np.sqrt(2.0 / 3.0)
    out = zscore_nonzero(volume)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (volume - 2.0) / std, rtol=1e-6)


def test_zscore_nonzero_edge_cases() -> None:
    np.testing.assert_array_equal(zscore_nonzero(np.zeros((2, 2))), np.zeros((2, 2), dtype=np.float32))
    constant = zscore_nonzero(np.array([0.0, 5.0, 5.0]))  # std 0: floored, so no division by zero
    assert np.isfinite(constant).all() and constant[1] == constant[2] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        zscore_nonzero(np.array([1.0, np.nan]))
