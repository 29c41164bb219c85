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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from producer.cases import check_case
from producer.scan import Input
from segq import faults, records, scheduler
from segq.broker import check_writable
from segq.celery_app import get_app
from segq.db import ensure_schema, session_scope
from segq.dicom import check_volume as check_series
from segq.dicom import seg_output, series_sha256
from segq.errors import InputError, TransientError
from segq.models import Dataset, Job, Status, Subtask, utcnow
from segq.modelspec import ModelSpec, file_sha256, files_sha256
from segq.settings import get_settings
from segq.storage import atomic_path, controls_in, printable, probability_path, temp_name
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


def fingerprint(input_sha256: str, model_sha256: str, params: dict[str, object]) -> str:
    """A volume's identity for this work: content hash, model checksum and parameters."""
    blob = json.dumps({"input": input_sha256, "model": model_sha256, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


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


def hash_inputs(inputs: list[Input]) -> dict[Path, str]:
    """Each input's sha256 (a DICOM series': of its files'), several at once (hashlib releases the GIL): a
    48-volume dataset is 1.7 GB to hash, seconds on one core before anything is queued."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1, max(len(inputs), 1))) as pool:
        return dict(zip([item.path for item in inputs], pool.map(_input_sha256, inputs), strict=True))


def job_outputs(output: str | Path, save_probabilities: bool, output_format: str | None = "nifti") -> list[Path]:
    """Every file a done job leaves: the mask and, as asked, its probabilities and DICOM SEG."""
    path = Path(output)
    if output_format == "dicom-seg":
        return [path]
    found = [path, *([probability_path(path)] if save_probabilities else [])]
    return found + ([seg_output(path)] if output_format == "both" else [])


def outputs_present(output: str | Path, save_probabilities: bool, output_format: str | None = "nifti") -> bool:
    return all(p.is_file() for p in job_outputs(output, save_probabilities, output_format))


def _same_dataset(params: dict[str, Any], other: dict[str, Any]) -> bool:
    """Same model and parameters; the priority may change between submissions."""
    return {k: v for k, v in params.items() if k != "priority"} == {k: v for k, v in other.items() if k != "priority"}


def _find_dataset(s: Session, name: str, out_dir: Path, model_sha: str, params: dict[str, Any]) -> Dataset | None:
    query = (select(Dataset).where(Dataset.name == name, Dataset.out_dir == str(out_dir),
                                   Dataset.model_sha256 == model_sha).order_by(Dataset.created_at.desc()))
    return next((ds for ds in s.scalars(query) if _same_dataset(ds.params, params)), None)


def _done_twin(s: Session, fp: str, save_probabilities: bool, output_format: str) -> Job | None:
    """The newest done job with this fingerprint whose output files (of the same format) still exist."""
    query = select(Job).where(Job.fingerprint == fp, Job.status == Status.DONE).order_by(Job.finished_at.desc())
    return next((job for job in s.scalars(query) if (job.output_format or "nifti") == output_format
                 and outputs_present(job.output_path, save_probabilities, output_format)), None)


def _copy_file(source: Path, target: Path) -> None:
    """Hard-link (same filesystem) or copy ``source`` to ``target``, atomically."""
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)


def _copy_outputs(source: Job, target: Path, save_probabilities: bool) -> bool:
    origin = Path(source.output_path)
    fmt = source.output_format or "nifti"
    pairs = list(zip(job_outputs(origin, save_probabilities, fmt), job_outputs(target, save_probabilities, fmt),
                     strict=True))
    try:
        for src, dst in pairs:
            if src.resolve() != dst.resolve():
                _copy_file(src, dst)
    except OSError as exc:
        logger.warning("cannot copy %s to %s (%s): segmenting the volume again", origin, target, exc)
        return False
    return True


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


def _claim_outputs(s: Session, dataset: Dataset, inputs: list[Input], overwrite: bool) -> None:
    """Each output path has one owner: a queued, running or done job of another dataset refuses the submission,
    unless ``overwrite``, which cancels that job with a reason naming this dataset (so its results say so)."""
    wanted = [str(item.output) for item in inputs]
    owners: list[Job] = []
    for i in range(0, len(wanted), 500):
        # A failed or cancelled job wrote nothing there; `segq retry` leaves it alone while another dataset owns it.
        owners += s.scalars(select(Job).where(Job.output_path.in_(wanted[i:i + 500]), Job.dataset_id != dataset.id,
                                              Job.status.not_in([Status.CANCELLED, Status.FAILED]))).all()
    if not owners:
        return
    others = sorted({job.dataset_id for job in owners})
    if not overwrite:
        raise InputError(f"{len(owners)} output(s) already belong to dataset(s) {', '.join(others)}, e.g. "
                         f"{owners[0].output_path}: choose another --out, or pass --overwrite to take them over")
    for job in owners:
        job.status, job.finished_at = Status.CANCELLED, job.finished_at or utcnow()
        job.error = f"output {job.output_path} taken over by dataset {dataset.id} '{dataset.name}' (submit --overwrite)"
        s.execute(update(Subtask).where(Subtask.job_id == job.id, Subtask.attempt == job.attempt,
                                        Subtask.status.in_([Status.QUEUED, Status.RUNNING]))
                  .values(status=Status.CANCELLED))
    logger.warning("dataset %s takes over %d output(s) from dataset(s) %s (--overwrite): their jobs are cancelled",
                   dataset.id, len(owners), ", ".join(others))


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


def _identity(item: Input, spec: ModelSpec) -> dict[str, object]:
    """What besides content and model makes two volumes the same work: for a series, what its SEG says."""
    params: dict[str, object] = dict(spec.params())
    if item.series is not None:
        params["output_format"] = item.output_format
        params["segment"] = [spec.segment_label, spec.segment_category, spec.segment_type]
    return params


def _input_sha256(item: Input) -> str:
    if item.series is not None:
        return series_sha256(item.series.files)
    return files_sha256(item.channels) if item.channels else file_sha256(item.path)


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


def _job_fields(item: Input, sha: str, fp: str) -> dict[str, Any]:
    series = item.series
    return {"input_sha256": sha, "fingerprint": fp, "output_path": str(item.output),
            "output_format": item.output_format,
            "study_uid": series.study_uid if series else None, "series_uid": series.uid if series else None,
            "modality": series.modality if series else None,
            "source_files": [str(f) for f in series.files] if series else None,
            "channel_files": [str(f) for f in item.channels] if item.channels else None}


def submit(inputs: list[Input], out_dir: Path, spec: ModelSpec, *, name: str | None = None,
           priority: str = "normal", max_windows_per_subtask: int | None = None,
           save_probabilities: bool = False, refused: list[str] | None = None, overwrite: bool = False) -> Submitted:
    """Write (or reuse) the dataset's rows, then queue what is not done.

    Nothing is queued if a NIfTI header, the checkpoint or the output directory is bad, or if another dataset
    owns an output path (unless ``overwrite``). ``refused`` (lines from the scan) is passed through to the
    result, with the series refused here added.
    """
    settings = get_settings()
    out_dir = out_dir.expanduser().resolve()
    name = check_dataset_name(name or out_dir.name)
    inputs, thin = _check(inputs, spec, settings.max_voxels)
    refused = [*(refused or []), *thin]
    if not inputs:
        raise InputError("nothing to segment: every input was refused:\n" + "\n".join(map(printable, refused)))
    prepare_out_dir(out_dir)
    check_broker()
    check_writable(settings.broker_url)  # a Redis at its memory limit is refused here, before any row exists
    ensure_schema()
    model_sha = spec.checksum()
    if not _checked_before(model_sha, spec):
        check_checkpoint(spec)
    params = {**spec.params(), "model": spec.to_dict(), "priority": priority,
              "max_windows_per_subtask": max_windows_per_subtask, "save_probabilities": save_probabilities}
    hashes = hash_inputs(inputs)
    fresh: list[str] = []
    again: list[str] = []
    done: list[str] = []
    twins: dict[str, tuple[Job, Path]] = {}
    with session_scope() as s:
        records.lock_submissions(s)  # two submits of one dataset at once: the second waits, then reuses it
        dataset = _find_dataset(s, name, out_dir, model_sha, params)
        faults.point("in_submit")
        reused = dataset is not None
        if dataset is None:
            dataset = Dataset(name=name, out_dir=str(out_dir), model_path=str(spec.path), model_sha256=model_sha,
                              params=params, priority=priority)
            s.add(dataset)
            s.flush()
        elif dataset.priority != priority:
            dataset.priority, dataset.params = priority, {**dataset.params, "priority": priority}
        _claim_outputs(s, dataset, inputs, overwrite)
        existing = {job.input_path: job for job in s.scalars(select(Job).where(Job.dataset_id == dataset.id))}
        job_ids = []
        for item in inputs:
            fp = fingerprint(hashes[item.path], model_sha, _identity(item, spec))
            fields = _job_fields(item, hashes[item.path], fp)
            job = existing.get(str(item.path))
            if job is None:
                job = Job(dataset_id=dataset.id, input_path=str(item.path), status=Status.QUEUED, **fields)
                s.add(job)
                s.flush()
                twin = _done_twin(s, fp, save_probabilities, item.output_format)
                if twin is not None:
                    twins[job.id] = (twin, item.output)
                fresh.append(job.id)
            elif (job.fingerprint == fp and job.status == Status.DONE
                  and outputs_present(job.output_path, save_probabilities, job.output_format)):
                done.append(job.id)
            else:
                for key, value in fields.items():
                    setattr(job, key, value)
                again.append(job.id)
            job_ids.append(job.id)
        dataset_id = dataset.id
    for job_id, (twin, output) in twins.items():
        if _copy_outputs(twin, output, save_probabilities) and records.copy_result(job_id, twin.id):
            logger.info("job %s: same volume, model and parameters as done job %s; copied its output", job_id, twin.id)
            fresh.remove(job_id)
            done.append(job_id)
    for job_id in again:
        records.requeue_job(job_id)
    queued = fresh + again  # they wait in SQL; the scheduler sends each when there is room
    try:
        scheduler.admit()
    except Exception as exc:  # kombu's OperationalError, redis' ResponseError (OOM): the broker refused
        _unqueue(dataset_id, fresh, again, reused, exc)
    logger.debug("dataset %s: queued %d volume(s), %d already done", dataset_id, len(queued), len(done))
    return Submitted(dataset_id, job_ids, queued, done, reused, refused)


__all__ = ["submit", "Submitted", "fingerprint", "check_broker", "outputs_present", "InputError",
           "check_volume", "check_checkpoint", "prepare_out_dir", "check_dataset_name"]
