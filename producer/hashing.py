"""A submission's content hashes, computed in the background while `segq submit` checks and queues.

An input's sha256 is its identity (producer/submit.py: fingerprint, resubmission, a mask copied from a done
twin), but a CT's first prepare need not wait for it: submit sends the first volumes' prepare messages, then
records their hashes, and prepare goes on only once the hash it computed itself equals the recorded one
(worker/submitted.py). The hashes run in input order, several at once (hashlib releases the GIL): a 48-volume
dataset is 1.7 GB to hash, seconds on one core.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import TracebackType

from producer.scan import Input
from producer.timings import Timings
from segq import clock, faults
from segq.dicom import series_sha256
from segq.errors import InputError
from segq.modelspec import file_sha256, files_sha256
from segq.storage import printable

logger = logging.getLogger("segq.submit")

MAX_THREADS = 16


def input_sha256(item: Input) -> str:
    """The input's content hash: a file's sha256, a case's over its files' in channel order, a DICOM series'
    over its files' (sorted)."""
    if item.series is not None:
        return series_sha256(item.series.files)
    return files_sha256(item.channels) if item.channels else file_sha256(item.path)


class Hashing:
    """Every input's sha256, started at once in a thread pool (the first inputs first); use as a context manager,
    so that leaving early (a check failed) cancels the hashes not started."""

    def __init__(self, inputs: list[Input], timings: Timings | None = None) -> None:
        self.timings = timings or Timings()
        self.spans: dict[Path, tuple[datetime, datetime]] = {}  # on the shared clock, for the timeline
        workers = min(MAX_THREADS, os.cpu_count() or 1, max(len(inputs), 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segq-submit-hash")
        self._futures: dict[Path, Future[str]] = {item.path: self._pool.submit(self._hash, item) for item in inputs}

    def _hash(self, item: Input) -> str:
        watch, started = clock.Stopwatch(), self.timings.now()
        digest = input_sha256(item)
        faults.point("in_input_hash", input=item.path.name)  # TEST ONLY: a hash that takes longer
        self.spans[item.path] = watch.span()
        self.timings.span(f"hash {item.path.name}", started, self.timings.now())
        return digest

    def all(self) -> dict[Path, str]:
        """Each input's sha256, waiting for those still running; InputError for an input that cannot be read."""
        digests = {}
        for path, future in self._futures.items():
            try:
                digests[path] = future.result()
            except OSError as exc:
                raise InputError(f"cannot read {printable(str(path))} to hash it ({exc.strerror or exc}): make it "
                                 "readable (or leave it out), then submit again") from None
        return digests

    def __enter__(self) -> Hashing:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._pool.shutdown(wait=kind is None, cancel_futures=True)
