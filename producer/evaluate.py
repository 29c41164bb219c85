"""Score a finished dataset against ground-truth masks: Dice and volume error per volume, stored with the job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from segq.db import session_scope
from segq.errors import InputError
from segq.metrics import dice, volume_error_ml
from segq.models import Job, Status
from segq.storage import NIFTI_SUFFIXES, strip_nifti_suffix


@dataclass(frozen=True)
class Score:
    job_id: str
    input_path: str
    dice: float | None
    volume_error_ml: float | None
    note: str = ""


def find_truth(truth_dir: Path, input_path: Path) -> Path | None:
    """The ground-truth file with the input's name (any NIfTI suffix) in ``truth_dir``."""
    stem = strip_nifti_suffix(input_path.name)
    for suffix in NIFTI_SUFFIXES:
        for name in (stem + suffix, stem + "_truth" + suffix, stem + "_seg" + suffix):
            if (truth_dir / name).is_file():
                return truth_dir / name
    return None


def score_job(job: Job, truth_dir: Path) -> Score:
    truth_path = find_truth(truth_dir, Path(job.input_path))
    if job.status != Status.DONE:
        return Score(job.id, job.input_path, None, None, f"not scored: {job.status.value}")
    if truth_path is None:
        return Score(job.id, job.input_path, None, None, f"no ground truth for it in {truth_dir}")
    if job.output_path.endswith(".dcm"):
        return Score(job.id, job.input_path, None, None, "not scored: only a DICOM SEG was written "
                     "(submit with --output-format both to score it)")
    pred_image = nib.load(job.output_path)
    truth = np.asarray(nib.load(str(truth_path)).dataobj)
    pred = np.asarray(pred_image.dataobj)
    if truth.shape != pred.shape:
        raise InputError(f"ground truth {truth_path} has shape {truth.shape}, the mask {pred.shape}")
    spacing = pred_image.header.get_zooms()[:3]
    return Score(job.id, job.input_path, round(dice(pred, truth), 4), round(volume_error_ml(pred, truth, spacing), 4))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def evaluate(dataset_id: str, truth_dir: Path, replace: bool = False) -> list[Score]:
    """Score every done job of the dataset that has a ground truth, and store Dice and volume error on its row.

    Volumes without a ground truth keep what was stored. Nothing is stored when no volume has one (a
    wrong ``--truth`` folder), or when stored Dice would change and ``replace`` is not given: a second
    evaluation against other masks must not silently overwrite the first.
    """
    if not truth_dir.is_dir():
        raise InputError(f"--truth {truth_dir} is not a directory")
    with session_scope() as s:
        jobs = list(s.query(Job).filter(Job.dataset_id == dataset_id).order_by(Job.input_path))
        if not jobs:
            raise InputError(f"dataset {dataset_id} has no jobs")
        scores = [score_job(job, truth_dir) for job in jobs]
        done = [job for job in jobs if job.status == Status.DONE]
        scored = [(job, score) for job, score in zip(jobs, scores, strict=True) if score.dice is not None]
        if done and not scored:
            raise InputError(f"--truth {truth_dir} holds no ground truth for any of the {len(done)} done volume(s) "
                             f"(looked for e.g. {Path(done[0].input_path).name} there): check the folder")
        changed = [(job, score) for job, score in scored if job.dice is not None and job.dice != score.dice]
        if changed and not replace:
            before = _mean([job.dice for job, _ in changed if job.dice is not None])
            after = _mean([score.dice for _, score in changed if score.dice is not None])
            raise InputError(f"{len(changed)} volume(s) already have Dice scores (mean {before:.4f}); --truth "
                             f"{truth_dir} gives mean {after:.4f}. Nothing stored: pass --replace to store the "
                             "new scores")
        for job, score in scored:
            job.dice, job.volume_error_ml = score.dice, score.volume_error_ml
    return scores
