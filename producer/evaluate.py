"""Score a finished dataset against ground-truth masks: Dice and volume error per volume, stored with the job.

A model.toml's binary mask is scored as one foreground. A bundle's label map is scored label by label against
a label-map truth (integer values, 0 the background): each label's Dice goes into the job's ``labels`` entries
(``"dice"``), and the job's one ``dice`` is their mean over the labels present in the truth or the mask (a label
absent from both has no Dice and does not count). The volume error is over every label > 0 together, as
``tumour_ml`` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from producer.cases import job_case
from producer.results import label_names
from segq.db import session_scope
from segq.errors import InputError
from segq.labelmaps import read_names
from segq.metrics import dice, volume_error_ml
from segq.models import Dataset, Job, Status
from segq.storage import NIFTI_SUFFIXES, strip_nifti_suffix


@dataclass(frozen=True)
class LabelScore:
    value: int
    name: str
    dice: float | None  # None: the label is in neither the truth nor the mask


@dataclass(frozen=True)
class Score:
    job_id: str
    input_path: str
    dice: float | None
    volume_error_ml: float | None
    note: str = ""
    labels: tuple[LabelScore, ...] = ()  # a label map's, per label; empty for a binary mask


def find_truth(truth_dir: Path, input_path: Path, case: str | None = None) -> Path | None:
    """The ground-truth file with the input's name (any NIfTI suffix) in ``truth_dir``.

    A case of several files is looked up by its name first (nnU-Net's ``BRATS_001.nii.gz`` for ``BRATS_001_0000``
    to ``_0003``), then by its first file's name.
    """
    stems = [strip_nifti_suffix(input_path.name)]
    if case is not None:
        stems.insert(0, case)
    for stem in dict.fromkeys(stems):
        for suffix in NIFTI_SUFFIXES:
            for name in (stem + suffix, stem + "_truth" + suffix, stem + "_seg" + suffix):
                if (truth_dir / name).is_file():
                    return truth_dir / name
    return None


def job_truth(truth_dir: Path, job: Job) -> Path | None:
    """The job's ground truth in ``truth_dir``: by its case's name for a case of several files, else its file's."""
    return find_truth(truth_dir, Path(job.input_path), job_case(job.output_path, job.channel_files))


def label_counts(values: np.ndarray, where: str) -> np.ndarray:
    """Voxels per label value of an integer label map; InputError (naming ``where``) for anything else."""
    if values.dtype.kind not in "biuf":
        raise InputError(f"{where} holds {values.dtype} voxels, not integer labels")
    if values.dtype.kind == "f" and (not np.isfinite(values).all() or (values != np.round(values)).any()):
        raise InputError(f"{where} holds fractional values: a label-map truth holds whole label values "
                         "(0 the background); give the truth as an integer label map")
    if values.size and values.min() < 0:
        raise InputError(f"{where} holds negative values ({values.min():g}): it is not a label map "
                         "(0 the background, 1.. the labels)")
    return np.bincount(values.ravel().astype(np.int64, copy=False))


@dataclass(frozen=True)
class Tally:
    """Voxels per label value in the mask, in the truth, and in both at once: every label's Dice in one pass
    over the voxels, however many labels there are."""

    pred: np.ndarray
    truth: np.ndarray
    both: np.ndarray

    @staticmethod
    def count(counts: np.ndarray, value: int) -> int:
        return int(counts[value]) if value < counts.size else 0

    @staticmethod
    def present(counts: np.ndarray) -> set[int]:
        return {int(v) for v in np.flatnonzero(counts) if v > 0}

    def dice(self, value: int) -> float | None:
        """2|P=v ∧ T=v| / (|P=v| + |T=v|); None for a value in neither."""
        total = self.count(self.pred, value) + self.count(self.truth, value)
        return None if total == 0 else round(2.0 * self.count(self.both, value) / total, 4)


def tally(pred: np.ndarray, truth: np.ndarray, truth_name: str) -> Tally:
    agree = pred.ravel() == truth.ravel()
    return Tally(label_counts(pred, "the mask"), label_counts(truth, f"ground truth {truth_name}"),
                 np.bincount(pred.ravel()[agree].astype(np.int64, copy=False)))


def _label_note(labels: tuple[LabelScore, ...], counts: Tally, truth_path: Path, names: dict[int, str]) -> str:
    """Each label's Dice, then what in the truth does not fit the model's labels."""
    parts = [f"{s.name} {s.dice:.4f}" if s.dice is not None else f"{s.name} absent" for s in labels]
    note = "per label: " + ", ".join(parts)
    unknown = sorted(counts.present(counts.truth) - {s.value for s in labels})
    if unknown:
        note += f"; truth label(s) {', '.join(map(str, unknown))} not among the model's: not scored"
    truth_names = read_names(truth_path) or {}
    differ = [v for v, name in sorted(truth_names.items()) if v in names and name != names[v]]
    if differ:
        note += "; the truth names " + ", ".join(f"{v} {truth_names[v]!r}, the model {names[v]!r}" for v in differ)
    return note


def _score_labels(job: Job, pred: np.ndarray, truth: np.ndarray, truth_path: Path, names: dict[int, str],
                  spacing: tuple[float, ...]) -> Score:
    counts = tally(pred, truth, str(truth_path))
    values = sorted(set(names) | counts.present(counts.pred))
    labels = tuple(LabelScore(v, names.get(v, f"label {v}"), counts.dice(v)) for v in values)
    scored = [s.dice for s in labels if s.dice is not None]
    mean = round(sum(scored) / len(scored), 4) if scored else 1.0  # both empty: agreement, as binary Dice says
    error = round(volume_error_ml(pred, truth, spacing), 4)
    return Score(job.id, job.input_path, mean, error, _label_note(labels, counts, truth_path, names), labels)


def score_job(job: Job, truth_dir: Path, names: dict[int, str] | None = None) -> Score:
    """Score one job; ``names`` (a label map's labels, background left out) scores it label by label."""
    truth_path = job_truth(truth_dir, job)
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
        raise InputError(f"ground truth {truth_path} has shape {truth.shape}, the mask {pred.shape}: "
                         "give a truth on the input's grid")
    spacing = pred_image.header.get_zooms()[:3]
    if names is not None:
        return _score_labels(job, pred, truth, truth_path, names, spacing)
    return Score(job.id, job.input_path, round(dice(pred, truth), 4), round(volume_error_ml(pred, truth, spacing), 4))


def with_label_dice(entries: list[dict[str, Any]] | None, labels: tuple[LabelScore, ...]) -> list[dict[str, Any]]:
    """A job's ``labels`` entries (new dicts: SQLAlchemy sees a JSON column change only on assignment) with each
    label's Dice; a label the entries lack (a job recorded before labels were) is added with its Dice alone."""
    by_value = {int(entry["value"]): dict(entry) for entry in entries or []}
    for label in labels:
        by_value.setdefault(label.value, {"value": label.value, "name": label.name})["dice"] = label.dice
    return [by_value[value] for value in sorted(by_value)]


def _stored_label_dice(job: Job) -> dict[int, Any]:
    return {int(e["value"]): e.get("dice") for e in job.labels or [] if "dice" in e}


def _changes(job: Job, score: Score) -> bool:
    """True when storing ``score`` would replace a different score stored before."""
    if job.dice is None:
        return False
    new = {label.value: label.dice for label in score.labels}
    return job.dice != score.dice or (bool(new) and _stored_label_dice(job) != new)


def _looked_for(job: Job) -> str:
    """The names find_truth tried first for the job, for a message."""
    case = job_case(job.output_path, job.channel_files)
    first = strip_nifti_suffix(Path(job.input_path).name)
    return f"{case}.nii.gz or {first}.nii.gz" if case is not None and case != first else Path(job.input_path).name


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
        dataset = s.get(Dataset, dataset_id)
        jobs = list(s.query(Job).filter(Job.dataset_id == dataset_id).order_by(Job.input_path))
        if dataset is None or not jobs:
            raise InputError(f"dataset {dataset_id} has no jobs")
        names = label_names(dataset)
        scores = [score_job(job, truth_dir, names) for job in jobs]
        done = [job for job in jobs if job.status == Status.DONE]
        scored = [(job, score) for job, score in zip(jobs, scores, strict=True) if score.dice is not None]
        if done and not scored:
            raise InputError(f"--truth {truth_dir} holds no ground truth for any of the {len(done)} done volume(s) "
                             f"(looked for e.g. {_looked_for(done[0])} there): check the folder")
        changed = [(job, score) for job, score in scored if _changes(job, score)]
        if changed and not replace:
            before = _mean([job.dice for job, _ in changed if job.dice is not None])
            after = _mean([score.dice for _, score in changed if score.dice is not None])
            raise InputError(f"{len(changed)} volume(s) already have Dice scores (mean {before:.4f}); --truth "
                             f"{truth_dir} gives mean {after:.4f}. Nothing stored: pass --replace to store the "
                             "new scores")
        for job, score in scored:
            job.dice, job.volume_error_ml = score.dice, score.volume_error_ml
            if score.labels:
                job.labels = with_label_dice(job.labels, score.labels)
    return scores
