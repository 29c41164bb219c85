"""The input streamed into the workspace in slab order, so a GPU part starts as soon as its rows are there.

A volume cut into several parts has its chord sent as soon as its plan is known (worker/tasks.py). prepare then
writes the padded input, (C, X, Y, Z) C-ordered so that each part's rows ``[lo, hi)`` are contiguous per channel,
one chunk at a time in slab order, and after each chunk records in ``rows.json`` how many leading rows are written
(written atomically, after the chunk's file handle is closed: on a shared filesystem close-to-open consistency
then shows a reader every byte the counter promises). A part waits for ``rows >= hi`` before it reads anything.

Rows only ever grow: a prepare delivered again (its worker killed mid-stream) writes the same values and never
moves the counter back, so a part already reading is never handed rows being rewritten to something else.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from segq import faults, storage
from segq.errors import CancelledError, StreamStalledError, WorkerLeaving
from segq.tiling import Slab
from worker import leaving

logger = logging.getLogger("segq.streaming")

ROWS = "rows.json"
POLL_SECONDS = 0.02


def chunk_bounds(slabs: Sequence[Slab], total: int) -> list[int]:
    """The row counts after each chunk: every distinct slab end (the rows a part needs, in the order parts
    start), then ``total``. Writing up to each in turn makes the first part ready first."""
    ends = sorted({min(s.hi, total) for s in slabs if s.hi > 0})
    return [e for e in ends if e < total] + [total]


def rows_ready(ws: Path) -> int:
    """How many leading rows of the streamed input are written (0 before the first chunk)."""
    try:
        return int(json.loads((ws / ROWS).read_text())["rows"])
    except FileNotFoundError:
        return 0


def _mark(ws: Path, rows: int, total: int) -> float:
    """Publish that ``rows`` leading rows are written; returns the time taken just before (a reader sees it later)."""
    marked = time.time()
    with storage.atomic_path(ws / ROWS, durable=False) as tmp:
        tmp.write_text(json.dumps({"rows": rows, "of": total, "time": marked}))
    return marked


def create_input(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The .npy file of ``shape`` (C-ordered) at full size, its voxels not yet written; returns the data's offset.

    An existing file of that header is kept as it is (a prepare delivered again rewrites only what is missing)."""
    header = _header(shape, dtype)
    size = len(header) + int(np.prod(shape)) * dtype.itemsize
    if not (path.is_file() and path.stat().st_size == size and _starts_with(path, header)):
        with storage.disk_errors(path), storage.atomic_path(path, durable=False) as tmp, open(tmp, "wb") as handle:
            handle.write(header)
            handle.truncate(size)  # sparse: the blocks are allocated as the chunks arrive
    return len(header)


def header_length(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of the .npy header before the voxels of a C-ordered array of ``shape``."""
    return len(_header(shape, dtype))


def _starts_with(path: Path, header: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(header)) == header


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def write_rows(ws: Path, path: Path, shape: tuple[int, ...], bounds: Sequence[int],
               rows: Callable[[int, int], np.ndarray], cancelled: Callable[[], bool] | None = None) -> None:
    """Write the input of ``shape`` (C, X, ...) chunk by chunk up to each of ``bounds``, ``rows(a, b)`` giving rows
    ``[a, b)`` as float32 (C, b - a, ...), and mark each chunk ready once it is in the file. CancelledError when
    ``cancelled()`` says the job ended meanwhile (its parts stop on their own, and its workspace goes)."""
    dtype = np.dtype(np.float32)
    offset = create_input(path, shape, dtype)
    done = rows_ready(ws)
    per_row = int(np.prod(shape[2:])) * dtype.itemsize
    lo = 0
    for hi in bounds:
        if cancelled is not None and cancelled():
            raise CancelledError(f"the job ended while its input was streamed ({done} of {shape[1]} rows written)")
        if hi > done:
            _write_chunk(path, offset, shape, per_row, max(lo, done), hi, rows)
            marked = _mark(ws, hi, shape[1])
            logger.info("rows [%d, %d) of %d ready at %.6f", max(lo, done), hi, shape[1], marked)
            faults.point("in_stream_rows", rows=hi, job=ws.parent.name, marked=f"{marked:.6f}")
        lo = hi


def _write_chunk(path: Path, offset: int, shape: tuple[int, ...], per_row: int, a: int, b: int,
                 rows: Callable[[int, int], np.ndarray]) -> None:
    chunk = np.ascontiguousarray(rows(a, b), dtype=np.float32)
    if chunk.shape != (shape[0], b - a, *shape[2:]):
        raise ValueError(f"rows [{a}, {b}) came as {chunk.shape}, not {(shape[0], b - a, *shape[2:])}")
    with storage.disk_errors(path), open(path, "r+b") as handle:  # closed before the mark: see the module doc
        for channel in range(shape[0]):
            handle.seek(offset + (channel * shape[1] + a) * per_row)
            handle.write(memoryview(chunk[channel]).cast("B"))


def wait_for_rows(ws: Path, hi: int, cancelled: Callable[[], bool] | None, stall_seconds: float) -> float:
    """Block until rows ``[0, hi)`` of the streamed input are written; returns the seconds waited.

    CancelledError when the job ended meanwhile (its prepare failed, or `segq cancel`); WorkerLeaving when this
    worker is told to leave (the part goes back to the queue); StreamStalledError (retried) when no row arrived for
    ``stall_seconds``: prepare's worker died, and its redelivery will resume the stream.
    """
    started = last_change = time.monotonic()
    seen = rows_ready(ws)
    while seen < hi:
        if cancelled is not None and cancelled():
            raise CancelledError(f"the job ended while a part waited for rows [0, {hi}) of its input")
        if leaving.leaving():
            raise WorkerLeaving(f"this worker is leaving (SIGTERM) while its part waited for rows [0, {hi}): "
                                "handed back for another worker")
        now = time.monotonic()
        if now - last_change > stall_seconds:
            raise StreamStalledError(
                f"rows [{seen}, {hi}) of the input in {ws} did not arrive for {stall_seconds:.0f} s "
                "(SEGQ_STREAM_STALL_SECONDS): the worker preparing it stopped or is stalled; the part is retried, "
                "and a prepare delivered again resumes the stream")
        time.sleep(POLL_SECONDS)
        current = rows_ready(ws)
        if current != seen:
            seen, last_change = current, time.monotonic()
    return time.monotonic() - started

