"""Follow datasets until every volume has ended: a live display on a terminal, a line per volume otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select

from segq import clock
from segq.db import session_scope
from segq.models import Job, Status
from segq.storage import printable

logger = logging.getLogger("segq.wait")


def _states(dataset_ids: Sequence[str]) -> list[tuple[str, Status, int]]:
    with session_scope() as s:
        return [(row[0], row[1], row[2]) for row in s.execute(select(Job.id, Job.status, Job.attempt)
                                                               .where(Job.dataset_id.in_(list(dataset_ids))))]


def all_ended(states: Sequence[tuple[str, Status, int]]) -> bool:
    """True when there are volumes and every one has ended now. Counting the volumes ever seen ending is not the
    same: one re-queued after it ended (`segq retry`, a resubmission) would count as ended while it runs again."""
    return bool(states) and all(status.final for _, status, _ in states)


def _jobs(job_ids: Sequence[str]) -> list[Job]:
    if not job_ids:
        return []
    with session_scope() as s:
        return list(s.scalars(select(Job).where(Job.id.in_(list(job_ids)))))


def describe(job: Job) -> str:
    """The line printed when a volume ends; its names and error are shown escaped (segq.storage.printable)."""
    if job.status == Status.DONE:
        return printable(f"done    {job.input_path} -> {job.output_path} ({job.tumour_voxels} voxels, "
                         f"{job.tumour_ml} mL, {job.windows} windows, {job.subtasks} subtasks)")
    return printable(f"{job.status.value:<7} {job.input_path}: {job.error or ''}")


def _order(job: Job) -> tuple[str, str]:
    return (job.finished_at.isoformat() if job.finished_at else "", job.input_path)


def _plain_printer(console: Any) -> Callable[[str], None]:
    """Print lines above the live display as text: a file name like ``[link=http://…]x.nii.gz`` is no markup."""
    from rich.text import Text

    return lambda line: console.print(Text(line))


def follow(dataset_ids: Sequence[str], *, timeout: float | None = None, poll: float = 1.0,
           echo: Callable[[str], None] = print, live: bool | None = None, title: str = "") -> list[Job]:
    """Block until every job of the datasets ended; returns them. Raises TimeoutError after ``timeout``.

    Each volume is announced once, when it ends (those already ended first). With ``live`` (default:
    stdout is a terminal) a rich display above the lines shows counts, subtasks, windows per second,
    per-worker throughput and the ETA; it is redrawn every ``poll`` seconds from the database.
    """
    if not dataset_ids:
        raise ValueError("follow needs at least one dataset id")
    live = sys.stdout.isatty() if live is None else live
    deadline = None if timeout is None else time.monotonic() + timeout
    reported: set[tuple[str, int]] = set()  # (job, attempt): a re-queued volume is announced again when it ends
    loading_said: set[str] = set()
    roster: set[str] | None = None  # the GPU workers at the last look: a line when one joins or leaves
    display: Any = None
    say = echo
    if live:
        from rich.live import Live

        display = Live(refresh_per_second=4, transient=True)
        display.start()
        say = _plain_printer(display.console)
    title = title or f"dataset {', '.join(dataset_ids)}"
    from producer.watch import gpu_workers_now, roster_lines

    try:
        while True:
            present = gpu_workers_now()
            for line in roster_lines(roster, present):
                say(line)
            roster = present if present is not None else roster
            states = _states(dataset_ids)
            ended = [job_id for job_id, status, attempt in states if status.final and (job_id, attempt) not in reported]
            for job in sorted(_jobs(ended), key=_order):
                if job.status.final and (job.id, job.attempt) not in reported:
                    reported.add((job.id, job.attempt))
                    say(describe(job))
            if display is not None:
                from producer.watch import render, snapshot

                display.update(render(snapshot(dataset_ids), title))
            else:
                from producer.watch import engines_loading, loading_line

                for worker, (what, seconds) in engines_loading(clock.timestamp()).items():
                    if worker not in loading_said:  # once: a log, not a display
                        loading_said.add(worker)
                        say(loading_line(worker, what, seconds))
            if all_ended(states):
                jobs = _jobs([job_id for job_id, _, _ in states])
                if all(job.status.final for job in jobs):  # none re-queued since the look above
                    return jobs
            if deadline is not None and time.monotonic() > deadline:
                unfinished = sum(1 for _, status, _ in states if not status.final)
                raise TimeoutError(f"{title}: {unfinished} volume(s) still unfinished")
            time.sleep(poll)
    finally:
        if display is not None:
            display.stop()


def wait_for(dataset_id: str, *, timeout: float | None = None, poll: float = 1.0,
             echo: Callable[[str], None] = print, live: bool | None = None) -> list[Job]:
    """Block until every job of the dataset ended (see ``follow``); used by ``segq submit --wait``."""
    return follow([dataset_id], timeout=timeout, poll=poll, echo=echo, live=live, title=f"dataset {dataset_id}")
