"""Wait for a dataset to finish, printing a line per volume as it ends (progress bar on a terminal)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from sqlalchemy import select

from segq.db import session_scope
from segq.models import Job, Status


def _finished(dataset_id: str) -> list[Job]:
    with session_scope() as s:
        return list(s.scalars(select(Job).where(Job.dataset_id == dataset_id)))


def describe(job: Job) -> str:
    if job.status == Status.DONE:
        return (f"done    {job.input_path} -> {job.output_path} ({job.tumour_voxels} voxels, "
                f"{job.tumour_ml} mL, {job.windows} windows, {job.subtasks} subtasks)")
    return f"{job.status.value:<7} {job.input_path}: {job.error or ''}"


def wait_for(dataset_id: str, *, timeout: float | None = None, poll: float = 1.0,
             echo: Callable[[str], None] = print) -> list[Job]:
    """Block until every job of the dataset ended; returns them. Raises TimeoutError after ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    reported: set[str] = set()
    progress = None
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=True)
    task = None
    try:
        if progress is not None:
            progress.start()
        while True:
            jobs = _finished(dataset_id)
            for job in jobs:
                if job.status.final and job.id not in reported:
                    reported.add(job.id)
                    (progress.console.print if progress else echo)(describe(job))
            if progress is not None:
                if task is None:
                    task = progress.add_task("volumes", total=len(jobs))
                progress.update(task, completed=len(reported))
            if jobs and len(reported) == len(jobs):
                return jobs
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"dataset {dataset_id}: {len(jobs) - len(reported)} volume(s) still running")
            time.sleep(poll)
    finally:
        if progress is not None:
            progress.stop()
