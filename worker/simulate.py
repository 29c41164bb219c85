"""TEST ONLY (SEGQ_BACKEND=simulate): GPU parts that sleep for the measured GPU time instead of running a network.

It lets the scheduler, Celery, Redis and the SQL database carry dozens of simulated GPUs on one CPU
machine (bench/simulate.py), to find where the orchestration itself saturates. A part sleeps
``SEGQ_SIMULATE_SECONDS_PER_WINDOW`` a window and writes a partial of zeros (a fixed probability of 0:
the masks are empty), through the same workspace, references, timeline and chord as a real part. No
torch is imported, so a worker process stays small; one process stands for ``SEGQ_SIMULATE_DEVICES``
GPUs, each of its threads one device. Never set it in production: the masks mean nothing.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from segq import clock, storage


def run_part(ws: Path, index: int, worker: str,
             seconds_per_window: float) -> tuple[dict[str, Any], tuple[datetime, datetime]]:
    """Sleep for the part's windows and write its (zero) partial; its reference and when it held the 'device'."""
    from worker.jobs import DECIDED, load_plan, plan_flags, slab_file, slab_reference

    plan, slabs = load_plan(ws)
    slab = slabs[index]
    watch = clock.Stopwatch()
    time.sleep(len(slab.starts) * seconds_per_window)
    held = watch.span()
    if len(slabs) == 1 and plan_flags(ws).get("decide"):  # as a GPU part that thresholds on the device
        mask = np.zeros([s.stop - s.start for s in plan.crop], dtype=np.uint8, order="F")
        storage.save_array_once(ws / DECIDED, mask)
        return {**slab_reference(slab, mask.shape, storage.array_checksum(mask), worker), "decided": True}, held
    # as a GPU part's (zeros need no division by the rows' weights to count as divided)
    array = np.zeros((slab.hi - slab.lo, *plan.padded_shape[1:]), dtype=np.float32, order="F")
    storage.save_array_once(ws / slab_file(index), array)
    return slab_reference(slab, array.shape, storage.array_checksum(array), worker), held
