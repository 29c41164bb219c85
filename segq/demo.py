"""Synthetic MR-like head volumes with ellipsoidal "tumours" and their ground truth (numpy + nibabel only).

Each volume is a textured ellipsoidal head (scalp rim, grey/white texture, dark ventricles) with one
to three bright ellipsoidal lesions inside the brain, a multiplicative bias field, Rician noise, an
arbitrary global intensity scale, and an affine with anisotropic spacing, a small in-plane rotation
and sometimes a left-right flip. Lesion sizes are drawn in millimetres, so thick-slice volumes have
flatter lesions in voxel space, as real scans do.

The lesion boundary in the image is the 50 % point of a partial-volume blend whose hard threshold is
exactly the ground-truth mask, so a perfect segmentation is attainable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

logger = logging.getLogger("segq.demo")

DEFAULT_SHAPE = (96, 96, 64)
IMAGES_DIR = "images"
TRUTH_DIR = "truth"
IN_PLANE_MM = (0.9, 1.1)
SLICE_MM = (1.5, 3.0)
LESION_RADIUS_MM = (7.0, 16.0)
LESION_CONTRAST = (1.6, 2.3)
MAX_LESIONS = 3
MIN_SHAPE = 32
EDGE_VOXELS = 0.6  # width of the partial-volume blend at structure boundaries


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid in voxel coordinates."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]

    def radius_field(self, grid: tuple[np.ndarray, ...]) -> np.ndarray:
        """Normalised radius: < 1 inside, 1 on the surface."""
        terms = [((g - c) / r) ** 2 for g, c, r in zip(grid, self.centre, self.radii, strict=True)]
        return np.sqrt(terms[0] + terms[1] + terms[2])

    def blend(self, grid: tuple[np.ndarray, ...]) -> np.ndarray:
        """Partial-volume weight in [0, 1], 0.5 exactly on the surface."""
        distance = (1.0 - self.radius_field(grid)) * min(self.radii)  # approximate, in voxels
        return 1.0 / (1.0 + np.exp(-np.clip(distance / EDGE_VOXELS, -30.0, 30.0)))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_vox: float) -> np.ndarray:
    """Gaussian-filtered white noise (via FFT, periodic), scaled to zero mean and unit std."""
    white = rng.standard_normal(shape)
    freqs = np.meshgrid(*(np.fft.fftfreq(n) for n in shape[:2]), np.fft.rfftfreq(shape[2]), indexing="ij")
    k2 = freqs[0] ** 2 + freqs[1] ** 2 + freqs[2] ** 2
    smooth = np.fft.irfftn(np.fft.rfftn(white) * np.exp(-2.0 * (np.pi * sigma_vox) ** 2 * k2), s=shape, axes=(0, 1, 2))
    smooth -= smooth.mean()
    return smooth / max(float(smooth.std()), 1e-12)


def random_affine(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Anisotropic spacing, a small in-plane rotation, maybe a left-right flip; world origin at the centre."""
    in_plane = rng.uniform(*IN_PLANE_MM)
    spacing = np.array([in_plane, in_plane, rng.uniform(*SLICE_MM)])
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    if rng.random() < 0.5:
        rotation[:, 0] *= -1.0  # LAS instead of RAS storage
    linear = rotation @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def _head(rng: np.random.Generator, shape: tuple[int, int, int]) -> Ellipsoid:
    centre = tuple(float(n / 2.0 + rng.uniform(-2.0, 2.0)) for n in shape)
    radii = (shape[0] * rng.uniform(0.38, 0.44), shape[1] * rng.uniform(0.38, 0.44), shape[2] * rng.uniform(0.38, 0.44))
    return Ellipsoid(centre, radii)  # type: ignore[arg-type]


def _inside(rng: np.random.Generator, head: Ellipsoid, radii: tuple[float, float, float], reach: float) -> Ellipsoid:
    """An ellipsoid of ``radii`` placed so that it lies within ``reach`` of the head's normalised radius."""
    margin = reach - max(r / h for r, h in zip(radii, head.radii, strict=True))
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    offset = direction * max(margin, 0.0) * rng.uniform(0.0, 1.0) ** (1 / 3)
    centre = tuple(float(c + o * h) for c, o, h in zip(head.centre, offset, head.radii, strict=True))
    return Ellipsoid(centre, radii)  # type: ignore[arg-type]


def _lesions(rng: np.random.Generator, head: Ellipsoid, spacing: np.ndarray) -> list[Ellipsoid]:
    lesions = []
    for _ in range(int(rng.integers(1, MAX_LESIONS + 1))):
        radius_mm = rng.uniform(*LESION_RADIUS_MM) * rng.uniform(0.75, 1.25, size=3)
        radii = tuple(float(r) for r in np.maximum(radius_mm / spacing, 1.5))
        lesions.append(_inside(rng, head, radii, reach=0.8))  # type: ignore[arg-type]
    return lesions


def _tissue(rng: np.random.Generator, shape: tuple[int, int, int], grid: tuple[np.ndarray, ...],
            head: Ellipsoid) -> np.ndarray:
    """Relative intensities: air 0, bright scalp, dark skull, brain ~1 with grey/white texture, dark ventricles."""
    r = head.radius_field(grid)
    head_weight = _shell(r, 1.0, min(head.radii))
    skull_weight = _shell(r, 0.94, min(head.radii))
    brain_weight = _shell(r, 0.88, min(head.radii))
    grey_white = np.tanh(2.0 * smooth_noise(rng, shape, 4.0)) * rng.uniform(0.08, 0.15)
    texture = smooth_noise(rng, shape, 2.0) * rng.uniform(0.03, 0.06)
    scalp = (head_weight - skull_weight) * rng.uniform(0.9, 1.25)  # bright like fat on T1: a distractor
    skull = (skull_weight - brain_weight) * rng.uniform(0.05, 0.2)
    image = scalp + skull + brain_weight * (1.0 + grey_white + texture)
    for _ in range(int(rng.integers(1, 3))):
        radii = tuple(float(h * rng.uniform(0.08, 0.18)) for h in head.radii)
        ventricle = _inside(rng, head, radii, reach=0.45)  # type: ignore[arg-type]
        weight = ventricle.blend(grid)
        image = image * (1.0 - weight) + weight * rng.uniform(0.3, 0.5)
    return image


def _shell(radius: np.ndarray, level: float, scale: float) -> np.ndarray:
    """Soft indicator of ``radius < level`` for a head whose smallest semi-axis is ``scale`` voxels."""
    return 1.0 / (1.0 + np.exp(-np.clip((level - radius) * scale / EDGE_VOXELS, -30.0, 30.0)))


def _bias_field(rng: np.random.Generator, grid: tuple[np.ndarray, ...], shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth multiplicative field (exp of a random quadratic), roughly 0.75..1.3 across the volume."""
    coords = [(g - (n - 1) / 2.0) / n for g, n in zip(grid, shape, strict=True)]
    linear, quadratic = np.zeros(shape), np.zeros(shape)
    for c in coords:
        linear = linear + rng.uniform(-0.25, 0.25) * c
    for c in coords:
        quadratic = quadratic + rng.uniform(-0.4, 0.4) * c * c
    return np.exp(linear + quadratic)


def make_volume(rng: np.random.Generator, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: ``(image float32, mask uint8 {0,1}, 4x4 affine)``; image and mask have ``shape``."""
    shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < MIN_SHAPE:
        raise ValueError(f"demo volumes need a 3D shape with every side >= {MIN_SHAPE}, got {shape}")
    affine = random_affine(rng, shape)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    grid = np.ogrid[: shape[0], : shape[1], : shape[2]]
    grid = tuple(g.astype(np.float64) for g in grid)
    head = _head(rng, shape)
    image = _tissue(rng, shape, grid, head)
    mask = np.zeros(shape, dtype=bool)
    for lesion in _lesions(rng, head, spacing):
        weight = lesion.blend(grid)
        level = rng.uniform(*LESION_CONTRAST) * (1.0 + 0.06 * smooth_noise(rng, shape, 1.5))
        image = image * (1.0 - weight) + weight * level
        mask |= lesion.radius_field(grid) <= 1.0
    image = image * _bias_field(rng, grid, shape)
    sigma = rng.uniform(0.02, 0.05)
    image = np.sqrt((image + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2)
    image *= rng.uniform(200.0, 1200.0)  # arbitrary scanner units: only a per-volume normalisation copes
    return image.astype(np.float32), mask.astype(np.uint8), affine


def write_demo_dataset(out_dir: Path, count: int, seed: int = 0,
                       shape: tuple[int, int, int] = DEFAULT_SHAPE) -> list[tuple[Path, Path]]:
    """Write ``count`` cases as ``out_dir/images/case_XXX.nii.gz`` with masks at ``out_dir/truth/case_XXX.nii.gz``.

    Masks live in a sibling folder so that scanning the images folder finds only images. The same
    ``seed`` gives the same cases. Returns ``(image, mask)`` path pairs.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out_dir = Path(out_dir)
    images, truth = out_dir / IMAGES_DIR, out_dir / TRUTH_DIR
    images.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(count):
        image, mask, affine = make_volume(rng, shape)
        name = f"case_{index:03d}.nii.gz"
        pair = (images / name, truth / name)
        _save(image, affine, pair[0])
        _save(mask, affine, pair[1])
        logger.info("wrote %s (%d lesion voxels)", pair[0], int(mask.sum()))
        pairs.append(pair)
    return pairs


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
