"""Queue a dataset: check headers, hash inputs, write rows; the scheduler sends each volume when there is room.

Submission is idempotent. A volume's identity is its fingerprint (content hash, model checksum and
sliding-window parameters). Submitting the same inputs to the same dataset (same name, output
directory, model and parameters) reuses that dataset: volumes already done, whose outputs still
exist, are reported done and cost nothing; the others are queued again as a new attempt. A volume
new to the dataset whose fingerprint is done in another dataset gets that mask copied to its own
output path instead of being segmented again.

A DICOM series is one volume whose identity is its content hash (over its files) with its output format and
segment description; a series that cannot be segmented (too thin for the model, too large) is refused alone
and the rest is queued.

A case of several files (one per channel) is one volume whose identity is the hash of its files' hashes in
channel order; its headers must show one channel each on one grid, else it is refused alone.

The content hashes are computed in the background (producer/hashing.py) and do not hold up a dataset's first
volumes (SEGQ_SUBMIT_AHEAD, one urgent CT among them): their job rows are written with the hash pending and their
prepare messages sent at once, then the hashes are recorded, and the rest of the dataset is queued as before. A
prepare goes on only once the recorded hash equals the one it computed itself (worker/submitted.py), so a file
that changed is still refused; a volume queued ahead that turns out to be done already (same fingerprint) gets
that mask as before, its prepare stopped; a submission that cannot record its hashes (an input unreadable, an
interrupt) withdraws what it queued ahead.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from producer.cases import check_case
from producer.hashing import Hashing
from producer.rows import (
    Request,
    Rows,
    claim_outputs,
    copy_outputs,
    done_twin,
    existing_jobs,
    fingerprint,
    identity,
    job_fields,
    open_dataset,
    outputs_present,
    segmented_before,
)
from producer.scan import Input
from producer.timings import Timings
from segq import records, scheduler
from segq.broker import check_writable
from segq.celery_app import get_app
from segq.db import ensure_schema, session_scope
from segq.dicom import check_volume as check_series
from segq.errors import InputError, TransientError
from segq.models import Dataset, Job, Status
from segq.modelspec import ModelSpec, file_sha256_cached
from segq.records import PENDING_SHA256
from segq.settings import get_settings
from segq.storage import controls_in, printable, temp_name
from segq.volumes import check_channels, read_header

logger = logging.getLogger("segq.submit")


@dataclass(frozen=True)
class Submitted:
    """One submission: every volume's job, those sent to the workers now and those already done."""

    dataset_id: str
    job_ids: list[str]
    queued: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    reused_dataset: bool = False
    refused: list[str] = field(default_factory=list)  # one line each: what was not queued, and why


def check_broker(timeout: float = 5.0) -> None:
    """Fail before any row is written when the broker does not answer."""
    conn = get_app().connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # kombu raises OperationalError or the transport's own errors
        raise TransientError(
            f"cannot reach the broker at {conn.as_uri()}: {exc}. Start Redis (redis-server) or set SEGQ_BROKER_URL"
        ) from exc
    finally:
        conn.release()


def check_volume(path: Path, spec: ModelSpec, max_voxels: int) -> None:
    """What the header tells: a readable 3D volume of real numbers, small enough, with the model's channel count."""
    check_channels(path, read_header(path, max_voxels), spec.in_channels)


def check_checkpoint(spec: ModelSpec) -> None:
    """Load the checkpoint once on the CPU and check that it fits the network the model file describes.

    Skipped, with a note, where torch is not installed (a producer-only machine): the workers check it then.
    """
    try:
        from worker.engines.model import build_checked
    except ImportError as exc:
        logger.info("checkpoint %s not checked at submit (%s): the workers will check it", spec.checkpoint, exc)
        return
    build_checked(spec)


def _checked_before(model_sha: str, spec: ModelSpec) -> bool:
    """True when a dataset already ran this checkpoint (same checksum) with this model file's settings: its
    fit was checked then. Checking costs seconds (torch, MONAI and the network built on the CPU), which every
    submission of a dataset, a CT or a resubmission would otherwise pay again."""
    model = json.loads(json.dumps(spec.to_dict()))  # as stored: JSON types
    with session_scope() as s:
        stored = s.scalars(select(Dataset.params).where(Dataset.model_sha256 == model_sha))
        return any(params.get("model") == model for params in stored)


def prepare_out_dir(out_dir: Path) -> None:
    """Create the output directory and prove it writable now, not after every volume's inference has run."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = temp_name(out_dir / "probe.nii.gz")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output directory {out_dir} is not writable ({exc.strerror or exc}): choose another "
                         "--out, or fix its permissions or mount") from None


NAME_MAX_CHARACTERS = 255  # the datasets.name column (String(255))


def check_dataset_name(name: str) -> str:
    """``name`` when it can be a dataset's name: shown by every command, so no control character (an ANSI escape
    in it would clear the screen or recolour `segq status`), and it fits its column. Rich markup in it is shown as
    text, never rendered."""
    if found := controls_in(name):
        raise InputError(f"dataset name '{printable(name)}' holds control characters ({found}): terminals act "
                         "on them when segq prints the name; pass a --name without them")
    if len(name) > NAME_MAX_CHARACTERS:
        raise InputError(f"the dataset name is {len(name)} characters long; at most {NAME_MAX_CHARACTERS}: pass "
                         "a shorter --name")
    return name


def _unqueue(dataset_id: str, fresh: list[str], unsent: list[str], reused: bool, exc: Exception) -> None:
    """Undo a submission the broker refused half-way, so nothing stays queued without a message.

    Rows created now are deleted (a message already sent for one finds no job and does nothing); jobs
    re-queued now but not sent are failed with the reason, so `segq retry` or a new submit picks them up.
    """
    reason = f"not queued: the broker refused the message ({type(exc).__name__}: {exc}); submit again"
    records.forget_submission(dataset_id, fresh, drop_dataset=not reused)
    for job_id in unsent:
        records.fail_job(job_id, reason)
    raise TransientError(f"the broker refused a message ({exc}): nothing of this submission was queued; "
                         "free memory in Redis or fix the connection, then submit again") from exc


def _check(inputs: list[Input], spec: ModelSpec, max_voxels: int) -> tuple[list[Input], list[str]]:
    """NIfTI headers must all be good (else nothing is queued); a series or a case the model cannot take is
    refused alone."""
    kept, refused = [], []
    for item in inputs:
        if item.case is not None:
            if (problem := check_case(item.channels or (item.path,), spec.in_channels, max_voxels)) is not None:
                refused.append(item.case.refused(problem).line())
                continue
        elif item.series is None:
            check_volume(item.path, spec, max_voxels)
        elif (problem := check_series(item.series, spec.roi_size, max_voxels)) is not None:
            refused.append(f"series {item.series.uid} in {item.series.directory}: {problem}")
            continue
        kept.append(item)
    return kept, refused


def submit(inputs: list[Input], out_dir: Path, spec: ModelSpec, *, name: str | None = None,
           priority: str = "normal", max_windows_per_subtask: int | None = None,
           save_probabilities: bool = False, refused: list[str] | None = None, overwrite: bool = False,
           timings: Timings | None = None) -> Submitted:
    """Write (or reuse) the dataset's rows, then queue what is not done; the first volumes go before their hashes.

    Nothing is queued if a NIfTI header, the checkpoint or the output directory is bad, or if another dataset
    owns an output path (unless ``overwrite``). ``refused`` (lines from the scan) is passed through to the
    result, with the series refused here added. ``timings`` gets the moments a waiting user sees: checks done,
    first job row, first prepare message sent, hashes known and recorded.
    """
    settings = get_settings()
    timings = timings or Timings()
    out_dir = out_dir.expanduser().resolve()
    name = check_dataset_name(name or out_dir.name)
    inputs, thin = _check(inputs, spec, settings.max_voxels)
    refused = [*(refused or []), *thin]
    if not inputs:
        raise InputError("nothing to segment: every input was refused:\n" + "\n".join(map(printable, refused)))
    with Hashing(inputs, timings) as hashes:
        ask = _request(name, out_dir, spec, priority, max_windows_per_subtask, save_probabilities, overwrite)
        timings.mark("checked")
        ahead = _queue_ahead(ask, inputs, settings.submit_ahead, timings)
        try:
            digests = hashes.all()
            timings.mark("hashed")
            rows = _write_rows(ask, inputs, digests, ahead)
        except BaseException as exc:  # an input unreadable, an interrupt, the database away: withdraw, then raise
            _withdraw(ahead, exc)
            raise
    timings.mark("hash_recorded")
    _record_hash_steps(rows, hashes.spans)
    submitted = _queue_rest(rows, ahead, refused, save_probabilities)
    timings.mark("submitted")
    return submitted


def _request(name: str, out_dir: Path, spec: ModelSpec, priority: str, max_windows_per_subtask: int | None,
             save_probabilities: bool, overwrite: bool) -> Request:
    """The checks that need no content hash, before any row: output directory, broker, schema, checkpoint."""
    settings = get_settings()
    prepare_out_dir(out_dir)
    check_broker()
    check_writable(settings.broker_url)  # a Redis at its memory limit is refused here, before any row exists
    ensure_schema()
    model_sha = spec.checksum(functools.partial(file_sha256_cached, cache=settings.data_dir / "checkpoint-sha256.json"))
    if not _checked_before(model_sha, spec):
        check_checkpoint(spec)
    params = {**spec.params(), "model": spec.to_dict(), "priority": priority,
              "max_windows_per_subtask": max_windows_per_subtask, "save_probabilities": save_probabilities}
    return Request(name, out_dir, spec, model_sha, params, priority, save_probabilities, overwrite)


def _queue_ahead(ask: Request, inputs: list[Input], count: int, timings: Timings) -> Rows:
    """Queue the first ``count`` volumes with their hashes pending and send their prepare messages now.

    Every output is claimed first (a refusal leaves nothing). A DICOM series, and a file this model has already
    segmented (a done job of any dataset read it: its hash says whether it is still the same work, and then its
    mask is reused without a prepare), wait for their hashes as before.
    """
    candidates = [item for item in inputs[:count] if item.series is None]
    rows = Rows()
    if not candidates:
        return rows
    with session_scope() as s:
        records.lock_submissions(s)
        seen = segmented_before(s, [str(item.path) for item in candidates], ask.model_sha)
        candidates = [item for item in candidates if str(item.path) not in seen]
        if not candidates:
            return rows  # no row, not even a new dataset's, before the hashes
        dataset, rows.reused = open_dataset(s, ask)
        rows.dataset_id = dataset.id
        claim_outputs(s, dataset, inputs, ask.overwrite)
        existing = existing_jobs(s, dataset.id, [str(item.path) for item in candidates])
        for item in candidates:
            fields = job_fields(item, PENDING_SHA256, PENDING_SHA256)
            job = existing.get(str(item.path))
            if job is None:
                job = Job(dataset_id=dataset.id, input_path=str(item.path), status=Status.QUEUED, **fields)
                s.add(job)
                s.flush()
                rows.fresh.append(job.id)
            else:
                rows.prior[job.id] = (job.input_sha256, job.fingerprint)
                for key, value in fields.items():
                    setattr(job, key, value)
                rows.again.append(job.id)
            rows.ahead[str(item.path)] = job.id
    timings.mark("job_row")
    for job_id in rows.again:
        records.requeue_job(job_id)
    try:
        sent = scheduler.admit()
    except Exception as exc:  # kombu's OperationalError, redis' ResponseError (OOM): the broker refused
        for job_id in rows.again:
            records.record_hash(job_id, *rows.prior[job_id])
        _unqueue(rows.dataset_id, rows.fresh, rows.again, rows.reused, exc)
    if set(sent) & set(rows.ahead.values()):
        timings.mark("prepare_sent")
    return rows


def _write_rows(ask: Request, inputs: list[Input], digests: dict[Path, str], ahead: Rows) -> Rows:
    """With every hash known: record those of the volumes queued ahead, and write (or find) every other row."""
    rows = Rows(ahead=ahead.ahead)
    queued_ahead = set(ahead.ahead.values())
    with session_scope() as s:
        records.lock_submissions(s)  # two submits of one dataset at once: the second waits, then reuses it
        dataset = s.get(Dataset, ahead.dataset_id) if ahead.dataset_id else None
        if dataset is None:
            dataset, rows.reused = open_dataset(s, ask)
        else:
            rows.reused = ahead.reused
        rows.dataset_id = dataset.id
        claim_outputs(s, dataset, inputs, ask.overwrite)
        existing = existing_jobs(s, dataset.id)
        for item in inputs:
            fp = fingerprint(digests[item.path], ask.model_sha, identity(item, ask.spec))
            fields = job_fields(item, digests[item.path], fp)
            job = existing.get(str(item.path))
            if job is not None and job.id in queued_ahead:
                _record_hash(s, job, fields, rows, ask.save_probabilities, item)
            elif job is None:
                job = Job(dataset_id=dataset.id, input_path=str(item.path), status=Status.QUEUED, **fields)
                s.add(job)
                s.flush()
                twin = done_twin(s, fp, ask.save_probabilities, item.output_format)
                if twin is not None:
                    rows.twins[job.id] = (twin, item.output)
                rows.fresh.append(job.id)
            elif (job.fingerprint == fp and job.status == Status.DONE
                  and outputs_present(job.output_path, ask.save_probabilities, job.output_format)):
                rows.done.append(job.id)
            else:
                for key, value in fields.items():
                    setattr(job, key, value)
                rows.again.append(job.id)
            rows.job_ids.append(job.id)
    return rows


def _record_hash(s: Session, job: Job, fields: dict[str, Any], rows: Rows, save_probabilities: bool,
                 item: Input) -> None:
    """The hash of a volume queued ahead of it: its prepare, waiting at its gate, goes on (or refuses a changed file).

    Found done elsewhere (same fingerprint), its hash stays pending here: after this transaction the twin's mask
    is copied and the job marked done with its hash at once, so its prepare stops at the gate without running on.
    Another submission that recorded other content meanwhile loses: this one's is the file now, as a new attempt.
    """
    if job.input_sha256 not in (PENDING_SHA256, fields["input_sha256"]):
        rows.again.append(job.id)
    else:
        rows.sent.append(job.id)
    rows.attempts[job.id] = job.attempt
    twin = done_twin(s, fields["fingerprint"], save_probabilities, item.output_format)
    if twin is not None and twin.id != job.id and job.input_sha256 == PENDING_SHA256:
        rows.twins[job.id] = (twin, item.output)
        rows.identities[job.id] = (fields["input_sha256"], fields["fingerprint"])
        fields = {key: value for key, value in fields.items() if key not in ("input_sha256", "fingerprint")}
    for key, value in fields.items():
        setattr(job, key, value)


def _record_hash_steps(rows: Rows, spans: dict[Path, tuple[datetime, datetime]]) -> None:
    """Each hash a volume's prepare could wait for, on the timeline (``steps``) beside that prepare."""
    worker = f"segq submit@{socket.gethostname()}"
    for path, job_id in rows.ahead.items():
        span = spans.get(Path(path))
        if span is not None and job_id in rows.attempts:
            records.record_step(job_id, rows.attempts[job_id], "hash", worker, span)


def _queue_rest(rows: Rows, ahead: Rows, refused: list[str], save_probabilities: bool) -> Submitted:
    """Copy the masks of volumes done elsewhere, re-queue and admit what waits; a broker that refuses takes back
    everything this submission queued, those sent ahead too."""
    for job_id, (twin, output) in rows.twins.items():
        identity = rows.identities.get(job_id)  # queued ahead: its hash is recorded with the copied result
        if copy_outputs(twin, output, save_probabilities) and records.copy_result(job_id, twin.id, identity):
            logger.info("job %s: same volume, model and parameters as done job %s; copied its output", job_id, twin.id)
            for waiting in (rows.fresh, rows.sent):
                if job_id in waiting:
                    waiting.remove(job_id)
            rows.done.append(job_id)
        elif identity is not None:
            records.record_hash(job_id, *identity)  # segmented after all: its prepare goes on
    for job_id in rows.again:
        records.requeue_job(job_id)
    queued = rows.sent + rows.fresh + rows.again  # they wait in SQL; the scheduler sends each when there is room
    try:
        scheduler.admit()
    except Exception as exc:  # kombu's OperationalError, redis' ResponseError (OOM): the broker refused
        _unqueue(rows.dataset_id, rows.fresh + ahead.fresh, rows.again + ahead.again, rows.reused, exc)
    logger.debug("dataset %s: queued %d volume(s), %d already done", rows.dataset_id, len(queued), len(rows.done))
    return Submitted(rows.dataset_id, rows.job_ids, queued, rows.done, rows.reused, refused)


def _withdraw(ahead: Rows, exc: BaseException) -> None:
    """Undo the volumes queued ahead of their hashes when those cannot be recorded (an input unreadable, an
    interrupt): rows created for them go, with their dataset if it is new, and a prepare already running finds no
    job at its gate and stops, leaving nothing; jobs re-queued for them get their former hash back and fail,
    saying why."""
    if not ahead.ahead:
        return
    reason = (f"not queued: `segq submit` stopped before it recorded the input's sha256 ({type(exc).__name__}: "
              f"{exc}); submit again")
    try:
        records.forget_submission(ahead.dataset_id, ahead.fresh, drop_dataset=not ahead.reused)
        for job_id in ahead.again:
            records.record_hash(job_id, *ahead.prior[job_id])
            records.fail_job(job_id, reason)
    except Exception:  # the database away: each prepare waiting for its hash fails after SEGQ_SUBMIT_HASH_WAIT
        logger.exception("could not withdraw the %d volume(s) queued ahead of their hash", len(ahead.ahead))


__all__ = ["submit", "Submitted", "fingerprint", "check_broker", "outputs_present", "InputError",
           "check_volume", "check_checkpoint", "prepare_out_dir", "check_dataset_name"]
