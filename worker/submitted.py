"""Prepare's gate: the file a prepare read must be the file `segq submit` hashed, whether or not that hash was known
when the prepare started.

`segq submit` queues a dataset's first volumes before it has hashed them (producer/submit.py), so a CT's prepare
runs while submit hashes it. Prepare hashes the file itself, as it always did, while it loads it; before anything
of the volume is written to the workspace, its hash must equal the one submit recorded, waiting for it if need
be. Nothing after prepare (no part, no merge, no output) exists for a file that changed: it is refused as before,
"changed since it was submitted". The file's size, modification time and inode are read before and after the
load, so a file rewritten while it was read is refused too, even where both hashes saw one version of it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from segq import records
from segq.errors import CancelledError, InputError
from segq.records import PENDING_SHA256, JobView
from segq.settings import Settings

logger = logging.getLogger("segq.jobs")

POLL_SECONDS = 0.05  # how often a prepare looks for the hash submit is computing (one indexed SELECT)

FileState = tuple[tuple[int, int, int], ...]


def file_state(files: list[Path]) -> FileState:
    """(size, modification time in ns, inode) of each file: what changes when a file is rewritten or replaced."""
    states = []
    for path in files:
        found = os.stat(path)
        states.append((found.st_size, found.st_mtime_ns, found.st_ino))
    return tuple(states)


def require_submitted(job: JobView, sha256: str, files: list[Path], before: FileState | None,
                      settings: Settings) -> None:
    """InputError unless the files are still as they were when prepare began reading them and ``sha256`` (prepare's
    own hash of them) is the one submit recorded. CancelledError when the job ended or was withdrawn meanwhile."""
    if before is not None and state_or_none(files) != before:
        raise InputError(f"input {job.input_path} changed while it was read (its size or modification time "
                         "moved): let whatever writes it finish, then submit it again")
    expected = submitted_sha256(job, settings)
    if sha256 != expected:
        raise InputError(f"input {job.input_path} changed since it was submitted (its sha256 is no longer "
                         f"{expected[:12]}...): submit it again")


def state_or_none(files: list[Path]) -> FileState | None:
    """:func:`file_state`, or None where a file cannot be read (missing: its loader says why)."""
    try:
        return file_state(files)
    except OSError:
        return None  # gone or unreadable now: as changed


def submitted_sha256(job: JobView, settings: Settings) -> str:
    """The input's sha256 as submit recorded it, waiting up to SEGQ_SUBMIT_HASH_WAIT seconds while submit still
    computes it. A job that ended, moved to another attempt or was withdrawn (its row deleted) meanwhile raises
    CancelledError: the step runner deletes its workspace and records nothing."""
    if job.input_sha256 != PENDING_SHA256:
        return job.input_sha256
    started = time.monotonic()
    while True:
        found = records.recorded_hash(job.id)
        if found is None or found[1].final or found[2] != job.attempt:
            raise CancelledError("the job ended or was withdrawn while its volume was prepared")
        if found[0] != PENDING_SHA256:
            waited = time.monotonic() - started
            if waited >= 0.5:
                logger.info("job %s: waited %.2f s for `segq submit` to record the input's sha256", job.id, waited)
            return str(found[0])
        if time.monotonic() - started > settings.submit_hash_wait:
            raise InputError(f"input {job.input_path}: `segq submit` did not record its sha256 within "
                             f"{settings.submit_hash_wait:.0f} s (SEGQ_SUBMIT_HASH_WAIT; did that submit stop?): "
                             "submit it again")
        time.sleep(POLL_SECONDS)
