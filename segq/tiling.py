"""The sliding-window plan, made exactly as MONAI's ``sliding_window_inference`` makes it.

MONAI's own helpers (``_get_scan_interval``, ``dense_patch_slices``, ``compute_importance_map``)
give the grid and weights, so a volume split across workers sums to what one
``sliding_window_inference`` call returns. Windows are then cut into slabs: contiguous groups along
the first spatial axis, each summed into its own partial by one subtask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Vec3 = tuple[int, int, int]


def _vec3(values: Any) -> Vec3:
    x, y, z = (int(v) for v in values)
    return (x, y, z)


@dataclass(frozen=True)
class Slab:
    """A group of windows whose partial sum covers ``[lo, hi)`` of the padded volume's first axis."""

    index: int
    starts: list[Vec3]
    lo: int
    hi: int

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "starts": [list(s) for s in self.starts], "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Slab:
        return cls(int(data["index"]), [_vec3(s) for s in data["starts"]], int(data["lo"]), int(data["hi"]))


@dataclass(frozen=True)
class WindowPlan:
    """Where every window sits in the padded volume, and how to get back to the input's shape."""

    image_shape: Vec3
    roi: Vec3
    overlap: float
    mode: str
    sigma_scale: float = 0.125
    pad: tuple[tuple[int, int], ...] = field(default=((0, 0), (0, 0), (0, 0)))
    scan_interval: Vec3 = (1, 1, 1)
    starts: list[Vec3] = field(default_factory=list)

    @property
    def padded_shape(self) -> Vec3:
        return tuple(s + a + b for s, (a, b) in zip(self.image_shape, self.pad, strict=True))  # type: ignore[return-value]

    @property
    def crop(self) -> tuple[slice, ...]:
        return tuple(slice(a, a + s) for s, (a, _) in zip(self.image_shape, self.pad, strict=True))

    def slabs(self, max_windows: int) -> list[Slab]:
        """Windows sorted along the first axis, cut into ``ceil(n / max_windows)`` near-equal groups."""
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        return self.split(math.ceil(len(self.starts) / max_windows))

    def split(self, count: int, sizes: Sequence[int] | None = None) -> list[Slab]:
        """Windows sorted along the first axis, cut into ``count`` near-equal groups (at least one), or into groups
        of ``sizes`` windows in that order (see :func:`part_windows`)."""
        order = sorted(self.starts, key=lambda s: s[0])
        if sizes is not None:
            if sum(sizes) != len(order) or min(sizes, default=0) < 1:
                raise ValueError(f"part sizes {list(sizes)} do not cut {len(order)} windows into nonempty parts")
            groups = np.split(np.arange(len(order)), np.cumsum(sizes)[:-1])
        else:
            groups = np.array_split(np.arange(len(order)), max(1, min(count, len(order))))
        slabs = []
        for k, idx in enumerate(groups):
            starts = [order[i] for i in idx]
            lo = min(s[0] for s in starts)
            slabs.append(Slab(k, starts, lo, max(s[0] for s in starts) + self.roi[0]))
        return slabs

    def to_json(self) -> dict[str, Any]:
        return {
            "image_shape": list(self.image_shape), "roi": list(self.roi), "overlap": self.overlap, "mode": self.mode,
            "sigma_scale": self.sigma_scale, "pad": [list(p) for p in self.pad],
            "scan_interval": list(self.scan_interval), "starts": [list(s) for s in self.starts],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WindowPlan:
        return cls(
            image_shape=_vec3(data["image_shape"]), roi=_vec3(data["roi"]), overlap=float(data["overlap"]),
            mode=data["mode"], sigma_scale=float(data["sigma_scale"]),
            pad=tuple((int(a), int(b)) for a, b in data["pad"]),
            scan_interval=_vec3(data["scan_interval"]), starts=[_vec3(s) for s in data["starts"]],
        )


def part_windows(windows: int, parts: int, stream_ratio: float = 0.0, cap: int | None = None) -> list[int]:
    """Windows per part, in slab order, so that parts of a streamed volume finish together.

    Part ``k``'s rows are written after those of the parts before it: with ``stream_ratio`` the time to write the
    whole input over the time one GPU takes for every window (``s``), part ``k`` can start at ``s`` times the
    windows before and in it, so it finishes at ``s * (n_0 + ... + n_k) + n_k`` (in windows' time). Equal for every
    ``k`` when ``n_k`` shrinks by ``1 + s`` a part. ``s = 0`` gives equal parts, the baseline. No part exceeds
    ``cap`` windows (what is over goes to the earliest parts below it); every part has at least one.
    """
    if windows < 1 or parts < 1:
        raise ValueError(f"need at least one window and one part, got {windows} windows and {parts} parts")
    parts = min(parts, windows)
    if cap is not None and parts * cap < windows:
        raise ValueError(f"{parts} parts of at most {cap} windows cannot hold {windows}")
    counts = _apportion(windows, [(1.0 + stream_ratio) ** -k for k in range(parts)])
    if cap is not None:
        excess = sum(max(c - cap, 0) for c in counts)
        counts = [min(c, cap) for c in counts]
        for k in range(parts):
            room = min(cap - counts[k], excess)
            counts[k] += room
            excess -= room
    return counts


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` cut in proportion to ``weights``, largest remainders first, each at least 1."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [max(1, math.floor(r)) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda k: (counts[k] - raw[k], k))  # most short of its share first
    k = 0
    while sum(counts) < total:
        counts[by_remainder[k % len(raw)]] += 1
        k += 1
    while sum(counts) > total:
        counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
    return counts


def partial_bytes(plan: WindowPlan, slabs: list[Slab], channels: int = 1, itemsize: int = 4) -> int:
    """Bytes of the partials ``slabs`` write to the workspace (.npy headers aside).

    A part's partial covers the rows its windows span (``hi - lo``, at least one ROI) across the whole padded
    y-z plane. Parts overlap by up to a ROI along the first axis, so many small parts need many times the volume:
    a 512x512x300 CT at ROI 96, overlap 0.5 (600 windows) in parts of one window writes 112 times its float32
    volume, 37 times at overlap 0.25 (196 windows).
    """
    _, ny, nz = plan.padded_shape
    return sum(s.hi - s.lo for s in slabs) * ny * nz * channels * itemsize


def scan_interval(padded: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> tuple[int, ...]:
    """The step between windows along each axis, as MONAI's private ``_get_scan_interval`` computes it
    (vendored: a private helper may change without notice; tests/unit/test_tiling_vs_monai.py compares them):
    ``int(roi * (1 - overlap))``, at least 1, and the ROI itself where it spans the whole axis."""
    return tuple(r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(padded, roi, strict=True))


def plan_windows(image_shape: tuple[int, ...], roi: tuple[int, ...], overlap: float, mode: str,
                 sigma_scale: float = 0.125) -> WindowPlan:
    """The window grid ``sliding_window_inference`` uses for a volume of ``image_shape``."""
    from monai.data.utils import dense_patch_slices

    if len(image_shape) != 3 or len(roi) != 3:
        raise ValueError(f"plan_windows takes 3 spatial dims, got image {image_shape} and roi {roi}")
    if any(s < 1 for s in image_shape):
        raise ValueError(f"image shape {image_shape} has an empty dimension")
    # MONAI pads each dimension smaller than the ROI symmetrically (extra voxel after) with zeros.
    pad = tuple((max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(image_shape, roi, strict=True))
    padded = tuple(max(s, r) for s, r in zip(image_shape, roi, strict=True))
    interval = scan_interval(padded, roi, overlap)
    slices = dense_patch_slices(padded, roi, interval, return_slice=False)
    # return_slice=False gives (start, stop) pairs per dimension
    starts = [_vec3(bounds[0] for bounds in window) for window in slices]  # type: ignore[index]
    return WindowPlan(tuple(image_shape), tuple(roi), overlap, mode, sigma_scale, pad, tuple(interval), starts)  # type: ignore[arg-type]


def importance_map(plan: WindowPlan) -> np.ndarray:
    """The per-window weight (float32, ROI shape), from MONAI's ``compute_importance_map``."""
    from monai.data.utils import compute_importance_map

    weights = compute_importance_map(plan.roi, mode=plan.mode, sigma_scale=plan.sigma_scale, device="cpu")
    return weights.float().numpy()


def weight_sum(plan: WindowPlan, weights: np.ndarray | None = None) -> np.ndarray:
    """Sum of every window's importance map over the padded volume: the divisor of the merge.

    The windows form a grid (every x start with every y and z start), so the sum is built axis by
    axis: the map summed over the z starts, that over the y starts, that over the x starts. Each voxel
    gets the same terms as window by window, about three times faster on a 600-window CT.
    """
    weights = importance_map(plan) if weights is None else weights
    rx, ry, rz = plan.roi
    nx, ny, nz = plan.padded_shape
    xs, ys, zs = (sorted({s[d] for s in plan.starts}) for d in range(3))
    total = np.zeros(plan.padded_shape, dtype=np.float32)
    if len(plan.starts) != len(xs) * len(ys) * len(zs):  # not a full grid: window by window
        for x, y, z in plan.starts:
            total[x : x + rx, y : y + ry, z : z + rz] += weights
        return total
    along_z = np.zeros((rx, ry, nz), dtype=np.float32)
    for z in zs:
        along_z[:, :, z : z + rz] += weights
    along_y = np.zeros((rx, ny, nz), dtype=np.float32)
    for y in ys:
        along_y[:, y : y + ry] += along_z
    for x in xs:
        total[x : x + rx] += along_y
    return total


def pad_volume(volume: np.ndarray, plan: WindowPlan) -> np.ndarray:
    """Zero-pad a channel-first volume (C, X, Y, Z) to the plan's padded shape, as MONAI does."""
    if not any(a or b for a, b in plan.pad):
        return volume
    return np.pad(volume, ((0, 0), *plan.pad), mode="constant", constant_values=0)
