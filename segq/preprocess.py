"""Intensity normalisation shared by training and inference (numpy only, so producers can import it)."""

from __future__ import annotations

import numpy as np

STD_FLOOR = 1e-8


def zscore_nonzero(volume: np.ndarray) -> np.ndarray:
    """Per-volume z-score: mean and std over the nonzero voxels, applied to every voxel.

    Statistics come from nonzero voxels only, so the zero padding around skull-stripped or
    cropped scans does not drag the mean down; the shift is applied everywhere, so zero voxels
    map to ``-mean / std`` and the volume stays one affine transform of the input. A volume
    with no nonzero voxels is returned as zeros. The result is float32.
    """
    data = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(data).all():
        raise ValueError("zscore_nonzero: the volume holds NaN or infinite values; fix or mask them before inference")
    nonzero = data[data != 0]
    if nonzero.size == 0:
        return np.zeros_like(data)
    # float64 accumulation: float32 sums over millions of voxels drift visibly
    mean = float(nonzero.mean(dtype=np.float64))
    std = max(float(nonzero.std(dtype=np.float64)), STD_FLOOR)
    return ((data - mean) / std).astype(np.float32, copy=False)
