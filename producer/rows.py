"""The rows of a submission: a volume's identity (fingerprint), the dataset it belongs to, who owns an output
path, and the mask of a done twin copied instead of segmenting the volume again (producer/submit.py)."""

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

from producer.scan import Input
from segq import faults
from segq.dicom import seg_output
from segq.errors import InputError
from segq.models import Dataset, Job, Status, Subtask, utcnow
from segq.modelspec import ModelSpec
from segq.storage import atomic_path, probability_path

logger = logging.getLogger("segq.submit")


def fingerprint(input_sha256: str, model_sha256: str, params: dict[str, object]) -> str:
    """A volume's identity for this work: content hash, model checksum and parameters."""
    blob = json.dumps({"input": input_sha256, "model": model_sha256, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def job_outputs(output: str | Path, save_probabilities: bool, output_format: str | None = "nifti") -> list[Path]:
    """Every file a done job leaves: the mask and, as asked, its probabilities and DICOM SEG."""
    path = Path(output)
    if output_format == "dicom-seg":
        return [path]
    found = [path, *([probability_path(path)] if save_probabilities else [])]
    return found + ([seg_output(path)] if output_format == "both" else [])


def outputs_present(output: str | Path, save_probabilities: bool, output_format: str | None = "nifti") -> bool:
    return all(p.is_file() for p in job_outputs(output, save_probabilities, output_format))


def same_dataset(params: dict[str, Any], other: dict[str, Any]) -> bool:
    """Same model and parameters; the priority may change between submissions."""
    return {k: v for k, v in params.items() if k != "priority"} == {k: v for k, v in other.items() if k != "priority"}


def find_dataset(s: Session, name: str, out_dir: Path, model_sha: str, params: dict[str, Any]) -> Dataset | None:
    query = (select(Dataset).where(Dataset.name == name, Dataset.out_dir == str(out_dir),
                                   Dataset.model_sha256 == model_sha).order_by(Dataset.created_at.desc()))
    return next((ds for ds in s.scalars(query) if same_dataset(ds.params, params)), None)


def done_twin(s: Session, fp: str, save_probabilities: bool, output_format: str) -> Job | None:
    """The newest done job with this fingerprint whose output files (of the same format) still exist."""
    query = select(Job).where(Job.fingerprint == fp, Job.status == Status.DONE).order_by(Job.finished_at.desc())
    return next((job for job in s.scalars(query) if (job.output_format or "nifti") == output_format
                 and outputs_present(job.output_path, save_probabilities, output_format)), None)


def copy_file(source: Path, target: Path) -> None:
    """Hard-link (same filesystem) or copy ``source`` to ``target``, atomically."""
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)


def copy_outputs(source: Job, target: Path, save_probabilities: bool) -> bool:
    origin = Path(source.output_path)
    fmt = source.output_format or "nifti"
    pairs = list(zip(job_outputs(origin, save_probabilities, fmt), job_outputs(target, save_probabilities, fmt),
                     strict=True))
    try:
        for src, dst in pairs:
            if src.resolve() != dst.resolve():
                copy_file(src, dst)
    except OSError as exc:
        logger.warning("cannot copy %s to %s (%s): segmenting the volume again", origin, target, exc)
        return False
    return True


def claim_outputs(s: Session, dataset: Dataset, inputs: list[Input], overwrite: bool) -> None:
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


def identity(item: Input, spec: ModelSpec) -> dict[str, object]:
    """What besides content and model makes two volumes the same work: for a series, what its SEG says."""
    params: dict[str, object] = dict(spec.params())
    if item.series is not None:
        params["output_format"] = item.output_format
        params["segment"] = [spec.segment_label, spec.segment_category, spec.segment_type]
    return params


def job_fields(item: Input, sha: str, fp: str) -> dict[str, Any]:
    series = item.series
    return {"input_sha256": sha, "fingerprint": fp, "output_path": str(item.output),
            "output_format": item.output_format,
            "study_uid": series.study_uid if series else None, "series_uid": series.uid if series else None,
            "modality": series.modality if series else None,
            "source_files": [str(f) for f in series.files] if series else None,
            "channel_files": [str(f) for f in item.channels] if item.channels else None}


@dataclass(frozen=True)
class Request:
    """One submission once checked: the dataset it names (name, output directory, model, parameters) and what its
    jobs share."""

    name: str
    out_dir: Path
    spec: ModelSpec
    model_sha: str
    params: dict[str, Any]
    priority: str
    save_probabilities: bool
    overwrite: bool


@dataclass
class Rows:
    """The job rows one transaction of a submission wrote or found, by what happens to each next."""

    dataset_id: str = ""
    reused: bool = False  # the dataset existed before this submission
    job_ids: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # rows created
    again: list[str] = field(default_factory=list)  # rows re-queued (a new attempt follows)
    done: list[str] = field(default_factory=list)
    ahead: dict[str, str] = field(default_factory=dict)  # input path -> job queued before its hash was known
    sent: list[str] = field(default_factory=list)  # queued ahead, their hash now recorded
    attempts: dict[str, int] = field(default_factory=dict)
    prior: dict[str, tuple[str, str]] = field(default_factory=dict)  # re-queued ahead: (sha256, fingerprint) before
    identities: dict[str, tuple[str, str]] = field(default_factory=dict)  # ahead, with a twin: (sha256, fingerprint)
    twins: dict[str, tuple[Job, Path]] = field(default_factory=dict)  # job -> a done job of the same fingerprint


def open_dataset(s: Session, ask: Request) -> tuple[Dataset, bool]:
    """The dataset ``ask`` names, made if new; and whether it existed. The caller holds the submission lock."""
    dataset = find_dataset(s, ask.name, ask.out_dir, ask.model_sha, ask.params)
    faults.point("in_submit")
    if dataset is None:
        dataset = Dataset(name=ask.name, out_dir=str(ask.out_dir), model_path=str(ask.spec.path),
                          model_sha256=ask.model_sha, params=ask.params, priority=ask.priority)
        s.add(dataset)
        s.flush()
        return dataset, False
    if dataset.priority != ask.priority:
        dataset.priority, dataset.params = ask.priority, {**dataset.params, "priority": ask.priority}
    return dataset, True


def existing_jobs(s: Session, dataset_id: str, paths: list[str] | None = None) -> dict[str, Job]:
    query = select(Job).where(Job.dataset_id == dataset_id)
    if paths is not None:
        query = query.where(Job.input_path.in_(paths))
    return {job.input_path: job for job in s.scalars(query)}


def segmented_before(s: Session, paths: list[str], model_sha: str) -> set[str]:
    """Those of ``paths`` that a done job of this model read (in any dataset)."""
    query = (select(Job.input_path).join(Dataset).where(Job.input_path.in_(paths), Job.status == Status.DONE,
                                                         Dataset.model_sha256 == model_sha))
    return set(s.scalars(query))


