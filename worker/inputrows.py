"""The network's input of a loaded volume, row by row: what prepare streams into the workspace (worker/streaming.py)
for a volume cut into several parts, equal bit for bit to the input written whole (worker.jobs.workspace_input)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from segq.preprocess import STD_FLOOR
from segq.tiling import Slab, WindowPlan


def zscore_stats(data: Any) -> list[tuple[float, float] | None]:
    """Each channel's mean and std over its nonzero voxels (None for a channel of zeros), of a C-contiguous
    float32 tensor (C, ...): the statistics worker.jobs.preprocess normalises with, also for a streamed input."""
    import torch

    stats: list[tuple[float, float] | None] = []
    for channel in data:
        count = int(torch.count_nonzero(channel))
        if count == 0:
            stats.append(None)
            continue
        # float32 sums of 4096-voxel rows, added up in float64: a float32 sum over millions of voxels drifts
        # visibly, a float64 one over the whole volume is several times slower. Zeros add nothing to either.
        rows = channel.reshape(-1, 4096) if channel.numel() % 4096 == 0 else channel.reshape(1, -1)
        mean = float(rows.sum(dim=1).double().sum()) / count
        square = float((torch.linalg.vector_norm(rows, dim=1).double() ** 2).sum()) / count
        stats.append((mean, max(math.sqrt(max(square - mean * mean, 0.0)), STD_FLOOR)))
    return stats


def normalise(data: Any, stats: Sequence[tuple[float, float] | None]) -> None:
    """``data`` (a float32 tensor (C, ...)) normalised in place with ``stats``: the same float32 operations
    whether it is the whole volume or a chunk of its rows, so a streamed input is the unstreamed one exactly."""
    for channel, stat in zip(data, stats, strict=True):
        if stat is None:
            channel.zero_()
        else:
            channel.sub_(stat[0]).mul_(1.0 / stat[1])


def sum_bytes(plan: WindowPlan, slabs: list[Slab]) -> int:
    """The workspace's running sum of a volume in several parts (worker/accumulator.py): the padded volume, float32."""
    return int(np.prod(plan.padded_shape)) * 4 if len(slabs) > 1 else 0


class InputRows:
    """Fills rows ``[a, b)`` of a loaded volume's padded, preprocessed input, one chunk at a time, into a (C, X, Y, Z)
    view of the workspace file (worker.streaming.write_rows).

    Each chunk is normalised with the whole volume's statistics (computed once, as worker.jobs.preprocess computes
    them) by the same float32 operations, so the streamed input equals the one written whole, bit for bit. The
    chunk is copied into the file's map and normalised there, in the file's order: no transposition, no temporary.
    """

    def __init__(self, volume: np.ndarray, plan: WindowPlan, method: str) -> None:
        self.volume, self.plan, self.method = volume, plan, method
        self._stats: list[tuple[float, float] | None] | None = None

    def stats(self) -> list[tuple[float, float] | None] | None:
        import torch

        if self.method == "zscore" and self._stats is None:
            zyx = torch.from_numpy(np.ascontiguousarray(self.volume.transpose(0, 3, 2, 1), dtype=np.float32))
            self._stats = zscore_stats(zyx)
        return self._stats

    def __call__(self, view: np.ndarray, a: int, b: int) -> None:
        import torch

        from worker.engines.inference import read_only_tensor

        (px, _), (py, _), (pz, _) = self.plan.pad
        _channels, nx, ny, nz = self.volume.shape
        xa, xb = max(a - px, 0), min(b - px, nx)
        if xa >= xb:
            return  # rows of padding only: zeros already
        stats = self.stats()  # before the first chunk, of the whole volume
        target = torch.from_numpy(view[:, xa + px : xb + px, py : py + ny, pz : pz + nz])
        target.copy_(read_only_tensor(self.volume[:, xa:xb]))
        if stats is not None:
            normalise(target, stats)
