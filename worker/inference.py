"""The slab loop: run a slab's windows through an engine and sum their weighted probabilities.

Free of Celery and storage, so it can be checked against MONAI directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from segq.tiling import Slab, Vec3
from worker.engines.base import Engine


def _gather(volume: np.ndarray, starts: Sequence[Vec3], roi: Vec3) -> torch.Tensor:
    rx, ry, rz = roi
    crops = np.stack([volume[:, x : x + rx, y : y + ry, z : z + rz] for x, y, z in starts]).astype(np.float32)
    tensor = torch.from_numpy(crops)
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


def _batches(starts: Sequence[Vec3], size: int) -> Iterator[Sequence[Vec3]]:
    for i in range(0, len(starts), size):
        yield starts[i : i + size]


def infer_slab(volume: np.ndarray, slab: Slab, roi: Vec3, weights: np.ndarray, engine: Engine,
               batch_size: int, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Importance-weighted sum of the target probability over the slab's windows.

    ``volume`` is the padded, channel-first input (memory-mapped); the result has shape
    ``(hi - lo, Y, Z)`` on the engine's device. Summing on the device means only one partial per
    slab leaves it, not one output per window (about 8x less at overlap 0.5). The next batch is read
    from disk while the device works on the current one.
    """
    device = engine.device
    partial = torch.zeros((slab.hi - slab.lo, *volume.shape[2:]), dtype=torch.float32, device=device)
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(device)
    rx, ry, rz = roi
    batches = list(_batches(slab.starts, batch_size))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segq-gather") as pool:
        pending = pool.submit(_gather, volume, batches[0], roi) if batches else None
        for i, starts in enumerate(batches):
            assert pending is not None
            host = pending.result()
            pending = pool.submit(_gather, volume, batches[i + 1], roi) if i + 1 < len(batches) else None
            if should_stop is not None and should_stop():
                break
            probs = engine(host.to(device, non_blocking=True))
            for p, (x, y, z) in zip(probs[:, 0], starts, strict=True):
                partial[x - slab.lo : x - slab.lo + rx, y : y + ry, z : z + rz].add_(p * w)
    return partial


def merge_partials(padded_shape: Vec3, partials: Sequence[tuple[int, np.ndarray]], weight_sum: np.ndarray,
                   crop: tuple[slice, ...]) -> np.ndarray:
    """Add slab partials at their offsets, divide by the summed importance map, crop the padding."""
    total = np.zeros(padded_shape, dtype=np.float32)
    for lo, part in partials:
        total[lo : lo + part.shape[0]] += part
    np.divide(total, weight_sum, out=total)
    return total[crop]
