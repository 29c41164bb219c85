"""Results as rows (one per volume) and a summary, for `segq results` (csv, json, table) and `segq report`.

The rows stay a plain list in every format, so CSV and JSON remain machine-readable; the summary is
a separate dict (printed on stderr for csv/json, as the last line for the table).

A bundle's label map adds three columns per label, ``<name>_voxels``, ``<name>_ml`` and ``<name>_dice``
(the name made a safe column name: letters, digits and ``_``, lower case). A model.toml's binary mask adds
none: its rows are today's, column for column.

A case of several files (one per channel) keeps its first file under ``input`` and adds two columns, ``case``
(its name, as its output is named) and ``channel_files`` (every file, in channel order: a list in JSON, joined
by ``;`` in CSV), to every row of the results it is in; a result without one has neither.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from producer.cases import case_label, job_case
from segq.models import Dataset, Job, Status
from segq.modelspec import spec_from_dict
from segq.storage import printable

COLUMNS = [
    "dataset", "job", "input", "output", "status", "error", "tumour_voxels", "tumour_ml", "windows", "subtasks",
    "queued_at", "started_at", "finished_at", "inference_seconds", "workers", "backend", "precision",
    "model_sha256", "dice", "volume_error_ml", "seconds", "preprocess_seconds", "merge_seconds", "elapsed_seconds",
    "modality", "study_uid", "series_uid", "output_format",
]
# What `segq results --format table` shows of a row (the label columns follow: see table_columns)
TABLE_COLUMNS = ["input", "status", "tumour_voxels", "tumour_ml", "windows", "subtasks", "inference_seconds",
                 "workers", "dice", "error"]
LABEL_FIELDS = ("voxels", "ml", "dice")  # what a job's ``labels`` entries hold, each a column per label
CASE_COLUMNS = ["case", "channel_files"]  # only in results holding a case of several files
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a CSV cell opening so runs as a spreadsheet formula


@dataclass(frozen=True)
class LabelColumn:
    """One label's columns: ``name`` as the pipeline names it, ``key`` the prefix of its column names."""

    name: str
    key: str

    @property
    def columns(self) -> list[str]:
        return [f"{self.key}_{field}" for field in LABEL_FIELDS]


def label_names(dataset: Dataset) -> dict[int, str] | None:
    """A bundle dataset's labels by value, background left out, with any value its jobs found unnamed
    (``label N``); None for a model.toml's binary mask (or a dataset recorded before models were stored)."""
    model = (dataset.params or {}).get("model")
    spec = spec_from_dict(model) if model else None
    if spec is None or not spec.is_bundle:
        return None
    names = {value: name for value, name in spec.label_names().items() if value != 0}
    for job in dataset.jobs:
        for entry in job.labels or []:
            names.setdefault(int(entry["value"]), str(entry["name"]))
    return dict(sorted(names.items()))


def column_key(name: str) -> str:
    """A label name as a column-name prefix: runs of anything but letters and digits become one ``_``.

    The key can then never open with ``=``, ``+``, ``-`` or ``@``, which spreadsheets run as a formula.
    """
    return re.sub(r"[\W_]+", "_", name).strip("_").lower()


def label_columns(datasets: list[Dataset]) -> list[LabelColumn]:
    """The label columns of these datasets: one set per label name, in the order first met (dataset, then value).

    A name whose key is taken (by a column of every row, or by another name with the same key) gets its
    value appended: a bundle label named ``tumour`` becomes ``tumour_1_voxels`` beside ``tumour_voxels``.
    """
    found: dict[str, LabelColumn] = {}
    taken = set(COLUMNS)
    for dataset in datasets:
        for value, name in (label_names(dataset) or {}).items():
            if name in found:
                continue
            key = column_key(name) or f"label_{value}"
            base, n = key, 0
            while any(column in taken for column in LabelColumn(name, key).columns):
                n += 1
                key = f"{base}_{value}" if n == 1 else f"{base}_{value}_{n}"
            found[name] = LabelColumn(name, key)
            taken.update(found[name].columns)
    return list(found.values())


def label_cells(job: Job, columns: list[LabelColumn]) -> dict[str, Any]:
    """The job's per-label voxels, mL and Dice under its label columns (None where it has no such label)."""
    by_name = {str(entry["name"]): entry for entry in job.labels or []}
    cells: dict[str, Any] = {}
    for column in columns:
        entry = by_name.get(column.name, {})
        cells.update({key: entry.get(field) for key, field in zip(column.columns, LABEL_FIELDS, strict=True)})
    return cells


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def job_row(dataset: Dataset, job: Job) -> dict[str, Any]:
    return {
        "dataset": dataset.id, "job": job.id, "input": job.input_path,
        "output": job.output_path if job.status == Status.DONE else None,
        "status": job.status.value, "error": job.error, "tumour_voxels": job.tumour_voxels,
        "tumour_ml": job.tumour_ml, "windows": job.windows, "subtasks": job.subtasks,
        "queued_at": _iso(job.queued_at), "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
        "inference_seconds": job.inference_seconds, "workers": ",".join(job.workers or []),
        "backend": job.backend, "precision": job.precision, "model_sha256": dataset.model_sha256, "dice": job.dice,
        "volume_error_ml": job.volume_error_ml, "seconds": job_seconds(job),
        "preprocess_seconds": job.preprocess_seconds, "merge_seconds": job.merge_seconds,
        # a DICOM series is named by its UIDs, never by its patient
        "modality": job.modality, "study_uid": job.study_uid, "series_uid": job.series_uid,
        "output_format": job.output_format or "nifti",
        "elapsed_seconds": job_elapsed(job),
    }


def job_span(job: Job) -> tuple[datetime, datetime] | None:
    """When the volume's first task started and when its result was recorded.

    ``started_at`` is stamped once the volume is loaded and planned, so the preprocessing before it
    is added back.
    """
    if job.started_at is None or job.finished_at is None:
        return None
    return job.started_at - timedelta(seconds=job.preprocess_seconds or 0.0), job.finished_at


def job_elapsed(job: Job) -> float | None:
    """From the volume's first task starting to its result: includes its slabs' wait in the GPU queue."""
    span = job_span(job)
    return None if span is None else round((span[1] - span[0]).total_seconds(), 3)


def job_seconds(job: Job) -> float | None:
    """A volume's own work: preprocessing, its subtasks' inference (summed) and the merge, without queue waits.

    The span from start to result would count the time its slabs waited behind other volumes' slabs, so
    the busy time of a dataset would exceed its wall time many times over.
    """
    parts = (job.preprocess_seconds, job.inference_seconds, job.merge_seconds)
    if all(part is None for part in parts):
        return None
    return round(sum(part or 0.0 for part in parts), 3)


def case_cells(job: Job) -> dict[str, Any]:
    """A job's case name and channel files (None for a job of one file)."""
    files = list(job.channel_files) if job.channel_files else None
    return {"case": job_case(job.output_path, files), "channel_files": files}


def input_shown(row: dict[str, Any]) -> str:
    """A row's input as a table shows it: a case of several files by its name and file count, else the file's name."""
    files = row.get("channel_files")
    if row.get("case") and files:
        return case_label(str(row["case"]), len(files))
    return Path(str(row["input"])).name


def rows(datasets: list[Dataset]) -> list[dict[str, Any]]:
    """One row per job. When any dataset has a label map, every row gets every label's columns (None where its
    dataset lacks the label), and when any job is a case of several files, every row gets the case columns, so
    CSV and JSON rows keep one shape."""
    columns = label_columns(datasets)
    cases = any(job.channel_files for ds in datasets for job in ds.jobs)
    return [{**job_row(ds, job), **(case_cells(job) if cases else {}), **label_cells(job, columns)}
            for ds in datasets for job in ds.jobs]


def row_columns(data: list[dict[str, Any]]) -> list[str]:
    """COLUMNS, then the label columns the rows carry, in their order."""
    extra = dict.fromkeys(key for row in data for key in row if key not in COLUMNS)
    return COLUMNS + list(extra)


def table_columns(data: list[dict[str, Any]], datasets: list[Dataset]) -> list[str]:
    """What the terminal table shows: TABLE_COLUMNS, then each label's mL and, once any label was scored, Dice."""
    columns = label_columns(datasets)
    scored = any(row.get(c.columns[2]) is not None for row in data for c in columns)
    return TABLE_COLUMNS + [name for c in columns for name in (c.columns[1:] if scored else c.columns[1:2])]


def to_csv(data: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = row_columns(data)
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in data:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    """A value as CSV writes it: a list joined by ``;``; text a spreadsheet would run as a formula (a file, case
    or dataset named ``=HYPERLINK(…)`` or ``-1+2``, an error) opened with ``'``, as OWASP advises. Numbers stay
    numbers (a negative volume error is no formula). The csv module quotes commas, quotes and newlines; other
    control characters are written as escapes (a bare CR, which it leaves unquoted, would end a reader's row, and
    ESC would act on the terminal the CSV is printed on)."""
    if value is None:
        return ""
    if isinstance(value, list):
        value = ";".join(map(str, value))
    if not isinstance(value, str):
        return value
    quoted = "'" + value if value.startswith(FORMULA_START) else value
    return "".join(c if c in "\n\t" else printable(c) for c in quoted)


def to_json(data: list[dict[str, Any]]) -> str:
    return json.dumps(data, indent=2)


def summarize(jobs: list[Job]) -> dict[str, Any]:
    """Counts, wall and median times and throughput of a set of volumes.

    ``wall_seconds`` runs from the first volume starting to the last one ending (what a night took);
    ``busy_seconds`` adds up each done volume's own work (no queue waits); throughput is over the wall time.
    """
    counts = {status: 0 for status in ("done", "failed", "cancelled", "running", "queued")}
    for job in jobs:
        counts[job.status.value] = counts.get(job.status.value, 0) + 1
    done = [job for job in jobs if job.status == Status.DONE]
    seconds = [s for job in done if (s := job_seconds(job)) is not None]
    spans = [span for job in jobs if (span := job_span(job)) is not None]
    wall = (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds() if spans else None
    windows = sum(job.windows or 0 for job in done)
    per_second = wall if wall and wall > 0 else None
    return {
        "volumes": len(jobs), **counts,
        "wall_seconds": None if wall is None else round(wall, 3),
        "busy_seconds": round(sum(seconds), 3),
        "median_seconds": round(statistics.median(seconds), 3) if seconds else None,
        "windows": windows,
        "volumes_per_hour": round(len(done) / per_second * 3600, 2) if per_second else None,
        "windows_per_second": round(windows / per_second, 2) if per_second else None,
        "tumour_ml_total": round(sum(job.tumour_ml or 0.0 for job in done), 3),
    }


def _num(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:g} {unit}"


def summary_line(summary: dict[str, Any]) -> str:
    """The summary as one human line, e.g. for stderr."""
    unfinished = summary["running"] + summary["queued"]
    return (f"summary: {summary['volumes']} volumes ({summary['done']} done, {summary['failed']} failed, "
            f"{summary['cancelled']} cancelled, {unfinished} unfinished); "
            f"wall {_num(summary['wall_seconds'], 's')}, busy {_num(summary['busy_seconds'], 's')}, "
            f"median {_num(summary['median_seconds'], 's')}/volume; "
            f"{_num(summary['volumes_per_hour'], 'volumes/h')}, {_num(summary['windows_per_second'], 'windows/s')}")
