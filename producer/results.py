"""Results as rows: one per volume, for `segq results` (csv, json, table) and `segq status`."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from typing import Any

from segq.models import Dataset, Job

COLUMNS = [
    "dataset", "job", "input", "output", "status", "error", "tumour_voxels", "tumour_ml", "windows", "subtasks",
    "queued_at", "started_at", "finished_at", "inference_seconds", "workers", "backend", "precision",
    "model_sha256", "dice", "volume_error_ml",
]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def job_row(dataset: Dataset, job: Job) -> dict[str, Any]:
    return {
        "dataset": dataset.id, "job": job.id, "input": job.input_path,
        "output": job.output_path if job.status.value == "done" else None,
        "status": job.status.value, "error": job.error, "tumour_voxels": job.tumour_voxels,
        "tumour_ml": job.tumour_ml, "windows": job.windows, "subtasks": job.subtasks,
        "queued_at": _iso(job.queued_at), "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
        "inference_seconds": job.inference_seconds, "workers": ",".join(job.workers or []),
        "backend": job.backend, "precision": job.precision, "model_sha256": dataset.model_sha256, "dice": job.dice,
        "volume_error_ml": job.volume_error_ml,
    }


def rows(datasets: list[Dataset]) -> list[dict[str, Any]]:
    return [job_row(ds, job) for ds in datasets for job in ds.jobs]


def to_csv(data: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in data:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    return buffer.getvalue()


def to_json(data: list[dict[str, Any]]) -> str:
    return json.dumps(data, indent=2)
