"""Agreement between a predicted and a ground-truth mask (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _binary_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {truth.shape}")
    return pred != 0, truth != 0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap 2|P∩T| / (|P| + |T|) of two masks (nonzero = foreground); 1.0 when both are empty."""
    p, t = _binary_pair(pred, truth)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def volume_error_ml(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Signed volume error in millilitres, predicted minus true (positive = over-segmentation).

    ``spacing`` is the voxel size in mm along each array axis (e.g. ``nibabel``'s ``header.get_zooms()``).
    """
    p, t = _binary_pair(pred, truth)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing has {len(spacing)} values but the masks have {p.ndim} dimensions")
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive mm values, got {tuple(spacing)}")
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    return (int(p.sum()) - int(t.sum())) * voxel_ml
