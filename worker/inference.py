"""The slab loop: run a slab's windows through an engine and sum their weighted probabilities.

Free of Celery and storage, so it can be checked against MONAI directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from segq.tiling import Slab, Vec3
from worker.engines.base import Engine


def _batches(starts: Sequence[Vec3], size: int) -> Iterator[Sequence[Vec3]]:
    for i in range(0, len(starts), size):
        yield starts[i : i + size]


def load_slab(volume: np.ndarray, slab: Slab, device: torch.device) -> torch.Tensor:
    """The slab's rows ``[lo, hi)`` of the padded volume, on ``device`` as float32, copied once.

    Every window of the slab is then a view of this tensor: crops are sliced on the device instead of
    being cut, stacked and copied from host memory batch by batch.
    """
    rows = np.ascontiguousarray(volume[:, slab.lo : slab.hi], dtype=np.float32)
    host = torch.from_numpy(rows)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def infer_slab(volume: np.ndarray, slab: Slab, roi: Vec3, weights: np.ndarray, engine: Engine,
               batch_size: int, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Importance-weighted sum of the target probability over the slab's windows.

    ``volume`` is the padded, channel-first input (memory-mapped); the result has shape
    ``(hi - lo, Y, Z)`` on the engine's device. Summing on the device means only one partial per
    slab leaves it, not one output per window (about 8x less at overlap 0.5). The slab's rows go to
    the device once; on a GPU the loop below only queues kernels, so batches run back to back.
    """
    device = engine.device
    rows = load_slab(volume, slab, device)
    partial = torch.zeros((slab.hi - slab.lo, *volume.shape[2:]), dtype=torch.float32, device=device)
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(device)
    rx, ry, rz = roi
    for starts in _batches(slab.starts, batch_size):
        if should_stop is not None and should_stop():
            break
        batch = torch.stack([rows[:, x - slab.lo : x - slab.lo + rx, y : y + ry, z : z + rz] for x, y, z in starts])
        probs = engine(batch)
        for p, (x, y, z) in zip(probs[:, 0], starts, strict=True):
            partial[x - slab.lo : x - slab.lo + rx, y : y + ry, z : z + rz].addcmul_(p, w)
    return partial


def merge_partials(padded_shape: Vec3, partials: Sequence[tuple[int, np.ndarray]], weight_sum: np.ndarray,
                   crop: tuple[slice, ...]) -> np.ndarray:
    """Add slab partials at their offsets, divide by the summed importance map, crop the padding."""
    if len(partials) == 1 and partials[0][0] == 0 and partials[0][1].shape == padded_shape:
        total = partials[0][1]  # one slab over the whole volume: divide it in place
    else:
        total = np.zeros(padded_shape, dtype=np.float32)
        for lo, part in partials:
            total[lo : lo + part.shape[0]] += part
    np.divide(total, weight_sum, out=total)
    return total[crop]
