"""State changes of jobs and subtasks in SQL. Each is one short transaction and safe to repeat."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from segq.db import session_scope
from segq.errors import InputError
from segq.models import Dataset, Job, Status, Step, Subtask, utcnow

logger = logging.getLogger("segq.records")

MAX_ERROR_CHARS = 2000
SUBMIT_LOCK_KEY = 0x5E9D0001  # pg_advisory_xact_lock keys: one constant for every producer
ADMIT_LOCK_KEY = 0x5E9D0002  # ... and one for every process that admits volumes (segq/scheduler.py)
# A job's input_sha256 (and fingerprint) while `segq submit` still hashes the input it queued ahead of its hash
# (producer/submit.py): never a sha256, so a check that forgets the case refuses the file rather than passing it.
PENDING_SHA256 = "pending"


@dataclass(frozen=True)
class JobView:
    """What a task needs to know about its job, detached from any session."""

    id: str
    dataset_id: str
    attempt: int
    status: Status
    input_path: str
    output_path: str
    model: dict[str, Any]
    model_sha256: str
    params: dict[str, Any]
    input_sha256: str = ""  # checked by the worker: the file must be the one submitted (PENDING_SHA256: not yet known)
    out_dir: str = ""  # the dataset's output directory: the output must still land inside it
    source_files: tuple[str, ...] = ()  # a DICOM series' files; empty for a NIfTI input
    output_format: str = "nifti"
    channel_files: tuple[str, ...] = ()  # a case of several files, in channel order; empty for one file

    @property
    def active(self) -> bool:
        return not self.status.final


def load_job(job_id: str) -> JobView | None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        ds = job.dataset
        return JobView(job.id, job.dataset_id, job.attempt, job.status, job.input_path, job.output_path,
                       ds.params.get("model", {}), ds.model_sha256, ds.params, job.input_sha256, ds.out_dir,
                       tuple(job.source_files or ()), job.output_format or "nifti", tuple(job.channel_files or ()))


def job_status(job_id: str) -> tuple[Status, int] | None:
    with session_scope() as s:
        row = s.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
        return (row[0], row[1]) if row else None


def recorded_hash(job_id: str) -> tuple[str, Status, int] | None:
    """(input sha256, status, attempt) of the job as it is now, the sha256 PENDING_SHA256 while submit still
    computes it; None when the job is gone (a submission withdrawn)."""
    with session_scope() as s:
        row = s.execute(select(Job.input_sha256, Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
        return (row[0], row[1], row[2]) if row else None


def record_hash(job_id: str, sha256: str, fingerprint: str) -> None:
    """Set the identity of a job queued ahead of its hash, if still pending: its hash, or its former one when the
    submission is withdrawn."""
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.input_sha256 == PENDING_SHA256)
                  .values(input_sha256=sha256, fingerprint=fingerprint))


def record_plan(job_id: str, attempt: int, *, shape: list[int], spacing: list[float], windows: int,
                slab_windows: list[int], preprocess_seconds: float, backend: str, precision: str) -> bool:
    """Mark the job running with its plan and create its subtask rows; False if it is no longer active."""
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.attempt != attempt or job.status.final:
            return False
        job.status = Status.RUNNING
        job.started_at = job.started_at or utcnow()
        job.shape, job.spacing, job.windows, job.subtasks = shape, spacing, windows, len(slab_windows)
        job.preprocess_seconds, job.backend, job.precision = preprocess_seconds, backend, precision
        existing = {p.slab for p in s.scalars(select(Subtask).where(Subtask.job_id == job_id,
                                                                     Subtask.attempt == attempt))}
        for slab, count in enumerate(slab_windows):
            if slab not in existing:
                s.add(Subtask(job_id=job_id, attempt=attempt, slab=slab, windows=count))
        return True


def start_subtask(job_id: str, attempt: int, slab: int, worker: str, incarnation: str | None = None) -> int:
    """Count one more delivery of the subtask and return the count (a poison subtask shows here); ``incarnation``:
    which start of ``worker`` runs it (segq/incarnation.py)."""
    with session_scope() as s:
        part = s.scalars(select(Subtask).where(Subtask.job_id == job_id, Subtask.attempt == attempt,
                                               Subtask.slab == slab).with_for_update()).one_or_none()
        if part is None:
            part = Subtask(job_id=job_id, attempt=attempt, slab=slab, windows=0, deliveries=0)
            s.add(part)
        part.deliveries = (part.deliveries or 0) + 1
        job = s.get(Job, job_id)
        # A job that ended meanwhile (a sibling slab failed it) keeps no subtask running: the task stops next.
        ended = job is None or job.status.final or job.attempt != attempt
        part.status = Status.CANCELLED if ended else Status.RUNNING
        part.worker, part.incarnation, part.started_at = worker, incarnation, utcnow()
        return part.deliveries


def finish_subtask(job_id: str, attempt: int, slab: int, seconds: float, batch_size: int,
                   gpu_peak_bytes: int | None = None) -> None:
    with session_scope() as s:
        s.execute(update(Subtask).where(Subtask.job_id == job_id, Subtask.attempt == attempt, Subtask.slab == slab)
                  .values(status=Status.DONE, finished_at=utcnow(), seconds=seconds, batch_size=batch_size,
                          gpu_peak_bytes=gpu_peak_bytes))


def subtask_done(job_id: str, attempt: int, slab: int) -> bool:
    with session_scope() as s:
        status = s.scalar(select(Subtask.status).where(Subtask.job_id == job_id, Subtask.attempt == attempt,
                                                       Subtask.slab == slab))
        return status == Status.DONE


def finish_job(job_id: str, attempt: int, *, tumour_voxels: int, tumour_ml: float, merge_seconds: float,
               labels: list[dict[str, Any]] | None = None) -> bool:
    """Mark the job done with its figures; False (and nothing changed) if it is no longer this attempt's."""
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.attempt != attempt or job.status.final:
            return False
        if job.input_sha256 == PENDING_SHA256:  # prepare waits for the hash (worker/submitted.py): never reached
            job.status, job.finished_at = Status.FAILED, utcnow()
            job.error = "the input's sha256 was still not recorded when its mask was ready: submit it again"
            return False
        parts = list(s.scalars(select(Subtask).where(Subtask.job_id == job_id, Subtask.attempt == attempt)))
        job.status, job.error, job.finished_at = Status.DONE, None, utcnow()
        job.tumour_voxels, job.tumour_ml, job.merge_seconds = tumour_voxels, tumour_ml, merge_seconds
        job.labels = labels
        job.inference_seconds = round(sum(p.seconds or 0.0 for p in parts), 3)
        job.workers = sorted({p.worker for p in parts if p.worker})
        return True


def fail_job(job_id: str, error: str, attempt: int | None = None, status: Status = Status.FAILED) -> bool:
    """Mark the job failed (or cancelled) unless it already ended; the first reason wins.

    Its unfinished subtasks end with it (as cancelled: they did not fail themselves), so nothing reports
    them running once no task of the job is left.
    """
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or (attempt is not None and job.attempt != attempt):
            return False
        _close_subtasks(s, job_id, job.attempt)  # also when the job ended first: a late slab may have started
        if job.status.final:
            return False
        job.status, job.error, job.finished_at = status, error[:MAX_ERROR_CHARS], utcnow()
        logger.warning("job %s %s: %s", job_id, status.value, error)
        return True


def output_claimed(job_id: str, output_path: str) -> bool:
    """True when the files at ``output_path`` belong to a job: this one, done, or another job that is not cancelled
    or failed (a dataset that took the path over with submit --overwrite). Otherwise whatever a merge of this job
    wrote there must go: an output exists only for a done job."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is not None and job.status == Status.DONE:
            return True
        other = s.scalar(select(Job.id).where(Job.output_path == output_path, Job.id != job_id,
                                              Job.status.not_in([Status.CANCELLED, Status.FAILED])).limit(1))
        return other is not None


def _close_subtasks(s: Session, job_id: str, attempt: int) -> None:
    s.execute(update(Subtask).where(Subtask.job_id == job_id, Subtask.attempt == attempt,
                                    Subtask.status.in_([Status.QUEUED, Status.RUNNING]))
              .values(status=Status.CANCELLED, finished_at=utcnow()))


def requeue_job(job_id: str) -> int:
    """Start a new attempt of the job (resume, retry): clears its results and returns the attempt."""
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise KeyError(job_id)
        return _new_attempt(job)


def _new_attempt(job: Job) -> int:
    job.attempt += 1
    job.status, job.error, job.queued_at = Status.QUEUED, None, utcnow()
    job.started_at = job.finished_at = job.admitted_at = None
    job.tumour_voxels = job.tumour_ml = job.windows = job.subtasks = None
    job.labels = None
    job.inference_seconds = job.merge_seconds = job.preprocess_seconds = None
    job.workers = None
    return job.attempt


def requeue_if(job_id: str, attempt: int) -> int | None:
    """Start a new attempt of the job only if it is still running ``attempt``: several sweepers may find the
    same orphan, and only the first re-queues it. Returns the new attempt, or None."""
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.attempt != attempt or job.status != Status.RUNNING:
            return None
        _close_subtasks(s, job_id, attempt)
        return _new_attempt(job)


def readmit_if(job_id: str, attempt: int) -> int | None:
    """Start a new attempt of a job admitted and not started (its prepare message is lost) only if it is still
    waiting on ``attempt``; it keeps its place in its dataset's order, and the next admission sends it again.
    Returns the new attempt, or None (another sweeper got there first, or it started or ended)."""
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.attempt != attempt or job.status != Status.QUEUED or job.admitted_at is None:
            return None
        queued_at = job.queued_at
        new = _new_attempt(job)
        job.queued_at = queued_at
        return new


def admitted_waiting() -> list[tuple[str, int]]:
    """(job, attempt) of each job admitted and not started: its prepare message is queued or being run
    (segq.deadworkers.lost_messages)."""
    with session_scope() as s:
        return [(job_id, int(attempt)) for job_id, attempt in s.execute(
            select(Job.id, Job.attempt).where(Job.status == Status.QUEUED, Job.admitted_at.is_not(None)))]


def awaited_parts() -> list[tuple[str, int, list[int], int]]:
    """(job, attempt, parts not done, parts) of each running job whose volume is prepared: the messages it waits
    on are those parts' or, once every part is done, its merge's (segq.deadworkers.lost_messages)."""
    with session_scope() as s:
        jobs = {(job_id, attempt): int(subtasks or 0) for job_id, attempt, subtasks in s.execute(
            select(Job.id, Job.attempt, Job.subtasks).where(Job.status == Status.RUNNING, Job.subtasks.is_not(None)))}
        waiting: dict[tuple[str, int], list[int]] = {key: [] for key in jobs}
        for job_id, attempt, slab in s.execute(
                select(Subtask.job_id, Subtask.attempt, Subtask.slab)
                .join(Job, (Job.id == Subtask.job_id) & (Job.attempt == Subtask.attempt))
                .where(Job.status == Status.RUNNING, Subtask.status != Status.DONE)):
            waiting.setdefault((job_id, attempt), []).append(int(slab))
    return [(job_id, attempt, sorted(waiting[(job_id, attempt)]), n) for (job_id, attempt), n in jobs.items()]


@dataclass(frozen=True)
class RunningPart:
    """A subtask running for a running job, and the worker (and start of it) that runs it."""

    job_id: str
    attempt: int
    worker: str
    incarnation: str | None


def running_subtasks(worker: str | None = None) -> list[RunningPart]:
    """Every running subtask of a running job that names its worker (only ``worker``'s when given)."""
    query = (select(Subtask.job_id, Subtask.attempt, Subtask.worker, Subtask.incarnation)
             .join(Job, (Job.id == Subtask.job_id) & (Job.attempt == Subtask.attempt))
             .where(Subtask.status == Status.RUNNING, Job.status == Status.RUNNING, Subtask.worker.is_not(None)))
    if worker is not None:
        query = query.where(Subtask.worker == worker)
    with session_scope() as s:
        return [RunningPart(job_id, int(attempt), str(name), incarnation)
                for job_id, attempt, name, incarnation in s.execute(query)]


def cancel_job(job_id: str, reason: str = "cancelled") -> tuple[int, int | None] | None:
    """Mark an unfinished job cancelled with its unfinished subtasks; returns (attempt, subtasks) or None.

    None means the job had already ended (done, failed, cancelled): nothing changed.
    """
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status.final:
            return None
        job.status, job.error, job.finished_at = Status.CANCELLED, reason[:MAX_ERROR_CHARS], utcnow()
        s.execute(update(Subtask).where(Subtask.job_id == job_id, Subtask.attempt == job.attempt,
                                        Subtask.status != Status.DONE).values(status=Status.CANCELLED))
        logger.info("job %s cancelled: %s", job_id, reason)
        return job.attempt, job.subtasks


RESULT_FIELDS = ("shape", "spacing", "tumour_voxels", "tumour_ml", "windows", "subtasks", "started_at", "finished_at",
                 "preprocess_seconds", "inference_seconds", "merge_seconds", "workers", "backend", "precision", "dice")


def copy_result(job_id: str, source_id: str, identity: tuple[str, str] | None = None) -> bool:
    """Mark the job done with the figures of an identical job (same fingerprint) that is done already.

    Used by an idempotent submission: the volume's output was copied beside the new job's output path,
    so no inference runs. False (nothing changed) if the source is not done or the job already ended.
    ``identity`` (sha256, fingerprint): a job queued ahead of its hash gets it in the same transaction, so its
    waiting prepare sees it done, never its hash alone.
    """
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        source = s.get(Job, source_id)
        if job is None or source is None or source.status != Status.DONE or job.status.final:
            return False
        if identity is not None and job.input_sha256 == PENDING_SHA256:
            job.input_sha256, job.fingerprint = identity
        if source.fingerprint != job.fingerprint:
            raise ValueError(f"job {source_id} is not the same work as job {job_id}: their fingerprints differ")
        for name in RESULT_FIELDS:
            setattr(job, name, getattr(source, name))
        job.status, job.error = Status.DONE, None
        return True


def lock(s: Session, key: int) -> None:
    """Serialise the holders of ``key`` until ``s`` commits.

    PostgreSQL takes a transaction-scoped advisory lock; SQLite takes its write lock now (a write as the
    first statement) instead of at the first insert, after the look-ups it must not race.
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    else:
        s.execute(update(Dataset).where(Dataset.id == "").values(name=Dataset.name))


def lock_submissions(s: Session) -> None:
    """Serialise submissions, so two submits of one dataset at once make one set of rows (without it both
    would look for the dataset, find none, and insert it twice)."""
    lock(s, SUBMIT_LOCK_KEY)


def forget_submission(dataset_id: str, job_ids: list[str], drop_dataset: bool) -> None:
    """Delete the job rows a failed submission created (and its dataset): their messages, if any were sent,
    then find no job and do nothing."""
    with session_scope() as s:
        s.execute(delete(Subtask).where(Subtask.job_id.in_(job_ids)))
        s.execute(delete(Job).where(Job.id.in_(job_ids)))
        if drop_dataset and not s.scalar(select(Job.id).where(Job.dataset_id == dataset_id).limit(1)):
            s.execute(delete(Dataset).where(Dataset.id == dataset_id))


def datasets(name_or_id: str | None = None) -> list[Dataset]:
    """Datasets (newest first) with their jobs loaded, optionally one by id or name."""
    from sqlalchemy.orm import selectinload

    with session_scope() as s:
        query = select(Dataset).options(selectinload(Dataset.jobs)).order_by(Dataset.created_at.desc())
        if name_or_id:
            query = query.where((Dataset.id == name_or_id) | (Dataset.name == name_or_id))
        return list(s.scalars(query))


def one_dataset(name_or_id: str) -> Dataset:
    """The dataset with this id, else the one with this name; InputError when none, or when a name is ambiguous."""
    found = datasets(name_or_id)
    by_id = [ds for ds in found if ds.id == name_or_id]
    if by_id:
        return by_id[0]
    if not found:
        raise InputError(f"no dataset with id or name {name_or_id!r}: see `segq status`")
    if len(found) > 1:
        raise InputError(f"{len(found)} datasets are named {name_or_id!r} (ids {', '.join(ds.id for ds in found)}): "
                         "name one by its id")
    return found[0]


def record_step(job_id: str, attempt: int, step: str, worker: str, span: tuple[datetime, datetime], *,
                part: int | None = None, device: str | None = None, busy: tuple[datetime, datetime] | None = None,
                windows: int | None = None) -> None:
    """Add one finished step to the timeline (``steps``): one insert, at the step's end. ``span``: when it ran, on
    the shared clock, its length from the monotonic one (``clock.Stopwatch.span``)."""
    with session_scope() as s:
        s.add(Step(job_id=job_id, attempt=attempt, step=step, part=part, worker=worker, device=device,
                   started_at=span[0], finished_at=span[1], busy_started_at=busy[0] if busy else None,
                   busy_finished_at=busy[1] if busy else None, windows=windows))


def hand_back_subtask(job_id: str, attempt: int, slab: int) -> None:
    """A part handed back by a worker that is leaving waits again (``segq metrics``, the split rule's backlog)."""
    with session_scope() as s:
        s.execute(update(Subtask).where(Subtask.job_id == job_id, Subtask.attempt == attempt, Subtask.slab == slab,
                                        Subtask.status == Status.RUNNING)
                  .values(status=Status.QUEUED, worker=None, started_at=None))


def active_models(limit: int = 4) -> list[tuple[dict[str, Any], str]]:
    """(model, checksum) of the datasets with volumes not finished, oldest dataset first, each model once (at most
    ``limit``): the engines a GPU worker that joins builds before it takes a message."""
    unfinished = select(Job.dataset_id).where(Job.status.in_((Status.QUEUED, Status.RUNNING)))
    with session_scope() as s:
        rows = s.execute(select(Dataset.params, Dataset.model_sha256).where(Dataset.id.in_(unfinished))
                         .order_by(Dataset.created_at)).all()
    models: dict[str, tuple[dict[str, Any], str]] = {}
    for params, sha in rows:
        model = dict((params or {}).get("model") or {})
        if model:
            models.setdefault(sha + json.dumps(model, sort_keys=True), (model, sha))
    return list(models.values())[:limit]
