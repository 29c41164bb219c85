"""The input streamed into the workspace in slab order, so a GPU part starts as soon as its rows are there.

A volume cut into several parts has its chord sent as soon as its plan is known (worker/tasks.py). prepare then
writes the padded input into its file (created whole at once, zeros), one chunk of rows ``[a, b)`` along the slab
axis at a time in slab order, each straight from the loaded volume into the file's memory map, in the file's own
order (NIfTI's for a model.toml's volume: no transposition); after each chunk the map is flushed (msync, on a network
filesystem; on a local one every process shares the page cache already) and ``rows.json`` (replaced atomically)
records how many leading rows are written. A part waits for ``rows >= hi`` before it maps
the file and reads anything.

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

from segq import clock, faults, storage
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
    marked = clock.local_time()  # this machine's: the readers it orders are on the same storage host in tests
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


def _starts_with(path: Path, header: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(header)) == header


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def write_rows(ws: Path, path: Path, shape: tuple[int, ...], bounds: Sequence[int],
               fill: Callable[[np.ndarray, int, int], None], nifti_order: bool = False,
               cancelled: Callable[[], bool] | None = None) -> None:
    """Write the input in ``path`` (a float32 .npy of ``shape``: (C, X, Y, Z), or with ``nifti_order`` (C, Z, Y, X))
    chunk by chunk up to each of ``bounds``: ``fill(view, a, b)`` writes rows ``[a, b)`` of its (C, X, Y, Z) view
    (the padding may stay untouched: a new file is zeros). Each chunk is flushed where it must be, then marked ready.
    CancelledError when ``cancelled()`` says the job ended meanwhile (its parts stop on their own)."""
    create_input(path, shape, np.dtype(np.float32))
    done = rows_ready(ws)
    flush = storage.on_network_filesystem(path)
    with storage.disk_errors(path):
        mapped = np.load(path, mmap_mode="r+", allow_pickle=False)
        view = mapped.transpose(0, 3, 2, 1) if nifti_order else mapped
        rows = view.shape[1]
        lo = 0
        for hi in bounds:
            if cancelled is not None and cancelled():
                raise CancelledError(f"the job ended while its input was streamed ({done} of {rows} rows written)")
            if hi > done:
                fill(view, max(lo, done), hi)
                if flush:  # in the file before the mark: a reader on another machine maps it after
                    mapped.flush()
                marked = _mark(ws, hi, rows)
                logger.info("rows [%d, %d) of %d ready at %.6f", max(lo, done), hi, rows, marked)
                faults.point("in_stream_rows", rows=hi, job=ws.parent.name, marked=f"{marked:.6f}")
            lo = hi
        del view, mapped


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

