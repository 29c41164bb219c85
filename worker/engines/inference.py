"""The slab loop: run a slab's windows through an engine and sum their weighted probabilities.

Free of Celery and storage, so it can be checked against MONAI directly.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any

import numpy as np
import torch

from segq import faults
from segq.tiling import Slab, Vec3
from worker.engines.base import Engine

logger = logging.getLogger("segq.inference")


def _batches(starts: Sequence[Vec3], size: int) -> Iterator[Sequence[Vec3]]:
    for i in range(0, len(starts), size):
        yield starts[i : i + size]


def nifti_order(array: np.ndarray) -> bool:
    """Whether a volume (C, X, Y, Z) or a partial (X, Y, Z) is laid out as NIfTI stores it: x fastest, z slowest.

    A job's workspace keeps the input in that order (the file's own: no transposition on the coordinator),
    and its partials and merge follow it; arrays in C order (tests, the gate, benchmarks) work unchanged.
    """
    return array.ndim >= 3 and array.strides[-3] < array.strides[-1]


def read_slab(volume: np.ndarray, slab: Slab, device: torch.device) -> torch.Tensor:
    """The slab's rows ``[lo, hi)`` of the padded volume in host memory as float32 (pinned for a GPU).

    One copy, in the volume's own memory order, straight into the (pinned) buffer; the tensor returned
    is a view of the slab's shape over it. This is the part of a slab that reads storage: it runs
    before the device is taken, so it overlaps the step that holds the device.
    """
    rows = read_only_tensor(volume[:, slab.lo : slab.hi])
    nifti = nifti_order(volume)
    if nifti:
        rows = rows.permute(0, 3, 2, 1)  # (C, Z, Y, X): dense in memory
    host = torch.empty(rows.shape, dtype=torch.float32, pin_memory=device.type == "cuda")
    host.copy_(rows)
    return host.permute(0, 3, 2, 1) if nifti else host


def infer_slab(volume: np.ndarray, slab: Slab, roi: Vec3, weights: np.ndarray, engine: Engine,
               batch_size: int, should_stop: Callable[[], bool] | None = None,
               device_lock: AbstractContextManager[Any] | None = None,
               starts: Sequence[Vec3] | None = None, channels_dtype: torch.dtype = torch.float32,
               finish: Callable[[torch.Tensor], np.ndarray] | None = None) -> np.ndarray:
    """Importance-weighted sum of the target probability over the slab's windows, in host memory.

    Given ``starts``, every window of the plan, the sum is divided on the device by the summed weights of
    all the windows over the slab's rows (:func:`row_weights`), so a merge only adds the partials.

    ``volume`` is the padded, channel-first input (memory-mapped); the result has shape
    ``(hi - lo, Y, Z)``, in the volume's memory order. Summing on the device means only one partial
    per slab leaves it, not one output per window (about 8x less at overlap 0.5). The slab's rows go
    to the device once, as one tensor every window is a view of; on a GPU the loop only queues
    kernels, so batches run back to back. ``device_lock`` is held from the copy to the device to the
    copy back, and only then: reading the input and writing the partial of one part overlap another
    part's inference. A partial of several channels leaves the device as ``channels_dtype``; given ``finish``,
    the divided partial is handed to it on the device instead, and what it returns is the result.
    """
    host = read_slab(volume, slab, engine.device)
    with device_lock or nullcontext():
        if finish is not None:
            return infer_rows(host, slab, roi, weights, engine, batch_size, should_stop, starts, finish,
                              tuple(volume.shape[2:]))
        partial = _divided_partial(host, slab, tuple(volume.shape[2:]), roi, weights, engine, batch_size,
                                   should_stop, starts)
        if partial.ndim == 4:
            partial = partial.to(channels_dtype)
        return partial_to_host(partial, volume)


def infer_rows(rows: torch.Tensor, slab: Slab, roi: Vec3, weights: np.ndarray, engine: Engine, batch_size: int,
               should_stop: Callable[[], bool] | None, starts: Sequence[Vec3] | None,
               finish: Callable[[torch.Tensor], np.ndarray], rest: tuple[int, ...] | None = None) -> np.ndarray:
    """:func:`infer_slab` of rows already read (a host tensor, or the device tensor a GPU worker preprocessed
    the case into), handed to ``finish`` on the device; the caller holds the device."""
    rest = tuple(rows.shape[2:]) if rest is None else rest
    partial = _divided_partial(rows, slab, rest, roi, weights, engine, batch_size, should_stop, starts)
    return _timed_finish(finish, partial, len(slab.starts))


def _divided_partial(rows: torch.Tensor, slab: Slab, rest: tuple[int, ...], roi: Vec3, weights: np.ndarray,
                     engine: Engine, batch_size: int, should_stop: Callable[[], bool] | None,
                     starts: Sequence[Vec3] | None) -> torch.Tensor:
    partial = slab_partial(rows, slab, rest, roi, weights, engine, batch_size, should_stop)
    if starts is not None:
        try:
            partial.div_(row_weights(starts, slab, rest, roi, weights, engine.device))
        except torch.OutOfMemoryError:  # no room on the device for the divisor: divide on the host
            partial = partial.cpu()
            partial.div_(row_weights(starts, slab, rest, roi, weights, partial.device))
    return partial


def _timed_finish(finish: Callable[[torch.Tensor], np.ndarray], partial: torch.Tensor, windows: int) -> np.ndarray:
    """``finish(partial)``, with the windows' and the decision's device times in the log (one line a volume)."""
    started = time.perf_counter()
    if partial.device.type == "cuda":
        torch.cuda.synchronize(partial.device)  # the windows' kernels: finish would wait for them anyway
    decided = time.perf_counter()
    result = finish(partial)
    logger.info("part of %d windows: device %.3f s to finish the windows, %.3f s to decide", windows,
                decided - started, time.perf_counter() - decided)
    return result


def row_weights(starts: Sequence[Vec3], slab: Slab, rest: tuple[int, ...], roi: Vec3, weights: np.ndarray,
                device: torch.device) -> torch.Tensor:
    """The importance maps of every window in ``starts`` summed over the slab's rows ``[lo, hi)``: its share
    of MONAI's count map. On a GPU a few hundred small adds (milliseconds); in the merge, a pass over the
    whole volume and, for each shape a coordinator process meets, the whole sum built first."""
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(device)
    total = torch.zeros((slab.hi - slab.lo, *rest), dtype=torch.float32, device=device)
    rx, ry, rz = roi
    for x, y, z in starts:
        a, b = max(x, slab.lo), min(x + rx, slab.hi)
        if a < b:
            total[a - slab.lo : b - slab.lo, y : y + ry, z : z + rz] += w[a - x : b - x]
    return total


def partial_to_host(partial: torch.Tensor, volume: np.ndarray) -> np.ndarray:
    """A slab's partial in host memory, in the memory order of ``volume`` (transposed on the device, or on the
    host when the device has no room for the transposed copy)."""
    if not nifti_order(volume) or partial.ndim == 4:
        return partial.cpu().numpy()
    try:
        return partial.permute(2, 1, 0).contiguous().cpu().numpy().transpose(2, 1, 0)
    except torch.OutOfMemoryError:  # a smaller ROI batch would not help: this is after the last one
        return np.asfortranarray(partial.cpu().numpy())


def slab_partial(rows: torch.Tensor, slab: Slab, rest: tuple[int, ...], roi: Vec3, weights: np.ndarray,
                 engine: Engine, batch_size: int, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """:func:`infer_slab` on the device: ``rows`` (the slab's rows, as :func:`read_slab` gives them) in,
    the partial sum of shape ``(hi - lo, *rest)`` (one output channel) or ``(K, hi - lo, *rest)`` out, left on
    the engine's device."""
    device = engine.device
    rows = rows.to(device, non_blocking=True)
    # Rows in NIfTI's order are transposed on the device, once; with no room there for a second copy of the
    # slab, each batch is gathered from the strided rows instead.
    with suppress(torch.OutOfMemoryError):
        rows = rows.contiguous()
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(device)
    rx, ry, rz = roi
    partial: torch.Tensor | None = None  # (K, rows, *rest): K output channels, known from the first batch
    for starts in _batches(slab.starts, batch_size):
        if should_stop is not None and should_stop():
            break
        crops = [rows[:, x - slab.lo : x - slab.lo + rx, y : y + ry, z : z + rz] for x, y, z in starts]
        if device.type == "cuda" and len(crops) < batch_size:
            # A short last batch is padded to the full one: cuDNN's autotuner (cudnn.benchmark) tunes every new
            # batch shape, per thread, for seconds; padding 8 windows of a 600-window CT costs 75 ms.
            crops += crops[-1:] * (batch_size - len(crops))
        faults.point("in_engine_batch", batch=len(crops))
        probs = engine(torch.stack(crops))
        if partial is None:
            partial = torch.zeros((probs.shape[1], slab.hi - slab.lo, *rest), dtype=torch.float32, device=device)
        for p, (x, y, z) in zip(probs[: len(starts)], starts, strict=True):
            partial[:, x - slab.lo : x - slab.lo + rx, y : y + ry, z : z + rz].addcmul_(p, w)
    if partial is None:  # stopped before the first batch: the caller discards it
        partial = torch.zeros((1, slab.hi - slab.lo, *rest), dtype=torch.float32, device=device)
    # One channel (a model.toml's target probability) keeps its partial's shape (rows, *rest); a bundle's
    # every channel gives (K, rows, *rest).
    return partial[0] if partial.shape[0] == 1 else partial


def merge_partials(padded_shape: Vec3, partials: Sequence[tuple[int, np.ndarray]],
                   crop: tuple[slice, ...]) -> np.ndarray:
    """Add slab partials, each divided already (by :func:`infer_slab` on the device), at their offsets and
    crop the padding. Partials of one channel are (rows, Y, Z); of K channels (K, rows, Y, Z), in float32
    or float16 (added in float32).

    The sum is kept in the partials' memory order (NIfTI's for a job), so no pass transposes. torch's
    threaded kernels do the adds: on a CT they are passes over hundreds of MB.
    """
    channels = partials[0][1].shape[0] if partials and partials[0][1].ndim == 4 else None
    lead = () if channels is None else (channels,)
    if channels is not None:
        crop = (slice(None), *crop)
    one = len(partials) == 1 and partials[0][0] == 0 and partials[0][1].shape == (*lead, *padded_shape)
    if one and partials[0][1].dtype == np.float32:
        return partials[0][1][crop]  # one slab over the whole volume: nothing to add
    if partials and channels is None and nifti_order(partials[0][1]):
        total = torch.zeros(tuple(reversed(padded_shape)), dtype=torch.float32).permute(2, 1, 0)
    else:
        total = torch.zeros((*lead, *padded_shape), dtype=torch.float32)
    for lo, part in partials:
        rows = read_only_tensor(part)
        if channels is None:
            total[lo : lo + part.shape[0]].add_(rows)
        else:
            total[:, lo : lo + part.shape[1]].add_(rows)
    return total.numpy()[crop]


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only array (a memory map, a cached map) without torch's warning: it is only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
