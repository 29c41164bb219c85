"""`segq resume`, `segq retry` and `segq cancel`: act on a dataset's jobs after the fact.

Every re-queue is a new attempt (``records.requeue_job``): messages of the old attempt that survive
in Redis are recognised as stale by the tasks and do nothing, so re-queueing is safe even when some of
them are still alive. A cancel marks the jobs in SQL first (the flag the tasks check between ROI
batches), then revokes their queued tasks by their known ids, then deletes what it can see of their
workspaces and temp outputs; the workers delete the rest as their tasks for the job end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import or_, select

from producer.scan import output_family
from producer.submit import check_broker
from segq import records, scheduler, storage
from segq.celery_app import get_app
from segq.db import ensure_schema, session_scope
from segq.errors import InputError
from segq.models import Dataset, Job, Status
from segq.names import revocable_task_ids
from segq.settings import get_settings

logger = logging.getLogger("segq.manage")

UNFINISHED = (Status.QUEUED, Status.RUNNING)
REVOKE_CHUNK = 1000


@dataclass(frozen=True)
class JobRef:
    id: str
    dataset_id: str
    status: Status
    priority: str
    output_path: str


def select_jobs(target: str | None, statuses: Iterable[Status], *, job_ids: bool = False) -> list[JobRef]:
    """Jobs in ``statuses`` of the dataset named or numbered ``target`` (every dataset when None).

    With ``job_ids``, ``target`` may also be one job's id. Raises InputError when ``target`` names nothing.
    """
    ensure_schema()
    with session_scope() as s:
        query = select(Job.id, Job.dataset_id, Job.status, Dataset.priority, Job.output_path).join(Dataset)
        if target:
            matches = [Dataset.id == target, Dataset.name == target] + ([Job.id == target] if job_ids else [])
            query = query.where(or_(*matches))
            if s.execute(query.limit(1)).first() is None:
                what = "dataset or job" if job_ids else "dataset"
                raise InputError(f"no {what} with id or name {target!r}: see `segq status`")
            named = list(s.scalars(select(Dataset.id).where(Dataset.name == target)))
            if len(named) > 1 and s.get(Dataset, target) is None and s.get(Job, target) is None:
                raise InputError(f"{len(named)} datasets are named {target!r} (ids {', '.join(named)}): "
                                 "name one by its id")
        rows = s.execute(query.where(Job.status.in_(list(statuses))).order_by(Job.queued_at, Job.input_path))
        return [JobRef(*row) for row in rows]


def _taken_over(jobs: list[JobRef]) -> set[str]:
    """Jobs whose output path another dataset's live job now owns (it took it over with submit --overwrite)."""
    with session_scope() as s:
        taken = set()
        for job in jobs:
            owner = s.scalar(select(Job.dataset_id).where(Job.output_path == job.output_path,
                                                          Job.dataset_id != job.dataset_id,
                                                          Job.status.not_in([Status.CANCELLED, Status.FAILED]))
                            .limit(1))
            if owner is not None:
                logger.warning("job %s not re-queued: its output %s now belongs to dataset %s", job.id,
                               job.output_path, owner)
                taken.add(job.id)
        return taken


def requeue(jobs: list[JobRef]) -> list[str]:
    """Start a new attempt of each job; the scheduler sends them as room opens, at their dataset's priority.

    A job whose output another dataset took over is left alone: running it would overwrite that mask.
    """
    taken = _taken_over(jobs)
    jobs = [job for job in jobs if job.id not in taken]
    if not jobs:
        return []
    check_broker()
    root = get_settings().storage_root
    for job in jobs:
        attempt = records.requeue_job(job.id)
        # Earlier attempts are dead from here on: their workspaces and temp outputs go before the new one starts.
        _remove_leftovers(job, root)
        logger.info("job %s re-queued as attempt %d (was %s)", job.id, attempt, job.status.value)
    scheduler.admit()
    return [job.id for job in jobs]


def resume(target: str | None) -> list[str]:
    """Re-queue exactly the unfinished (queued or running) jobs, e.g. after workers and Redis were stopped.

    Done, failed and cancelled jobs are not run again; what a killed worker left of them (a workspace
    it had not deleted yet, a temp file) is deleted where this machine sees the storage.
    """
    requeued = requeue(select_jobs(target, UNFINISHED))
    root = get_settings().storage_root
    for job in select_jobs(target, [s for s in Status if s.final]):
        _remove_leftovers(job, root)
    return requeued


def retry(target: str | None, *, failed: bool = True, cancelled: bool = False) -> list[str]:
    """Re-queue failed (and, if asked, cancelled) jobs after their cause was fixed."""
    statuses = [s for s, wanted in ((Status.FAILED, failed), (Status.CANCELLED, cancelled)) if wanted]
    if not statuses:
        raise InputError("say what to retry: --failed and/or --cancelled")
    return requeue(select_jobs(target, statuses))


def _revoke(task_ids: list[str]) -> None:
    """Tell the workers to drop these tasks when they receive them (best effort: SQL already says cancelled)."""
    if not task_ids:
        return
    try:
        control = get_app().control
        for i in range(0, len(task_ids), REVOKE_CHUNK):
            control.revoke(task_ids[i : i + REVOKE_CHUNK])
    except Exception as exc:  # kombu's connection errors vary by transport
        logger.warning("could not revoke %d task(s) (%s); the workers still skip them, as the jobs are cancelled",
                       len(task_ids), exc)


def _remove_leftovers(job: JobRef, root: Path, outputs: bool = False) -> None:
    """Delete the job's workspace (all attempts) and any temp output a killed writer left, where visible; with
    ``outputs`` (a job just cancelled, so not done) also what its merge already renamed into place.

    A merge still running then fails on its vanished temp file or finds its job ended: either way the worker
    removes whatever it writes after this (worker/steps.py, _drop_outputs)."""
    storage.remove_tree(storage.job_dir(root, job.id))
    for path in output_family(Path(job.output_path)):
        storage.remove_stale_temps(path)
        if outputs:
            path.unlink(missing_ok=True)


def cancel(target: str) -> list[str]:
    """Cancel the unfinished jobs of a dataset (or one job): mark, revoke, clean up. Returns their ids."""
    jobs = select_jobs(target, UNFINISHED, job_ids=True)
    cancelled: list[JobRef] = []
    task_ids: list[str] = []
    for job in jobs:
        marked = records.cancel_job(job.id, "cancelled by segq cancel")
        if marked is None:
            continue  # ended on its own meanwhile
        cancelled.append(job)
        task_ids += revocable_task_ids(job.id, *marked)
    _revoke(task_ids)
    root = get_settings().storage_root
    for job in cancelled:
        _remove_leftovers(job, root, outputs=True)
    if cancelled:
        scheduler.admit_quietly()  # their room goes to volumes still waiting (of other datasets)
    logger.info("cancelled %d job(s), revoked %d task(s)", len(cancelled), len(task_ids))
    return [job.id for job in cancelled]
