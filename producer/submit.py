"""Queue a dataset: check headers, hash inputs, write rows, then send one task per volume."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from producer.scan import Input
from segq.celery_app import COORDINATOR_QUEUE, SEGMENT_VOLUME, get_app, queue_for
from segq.db import ensure_schema, session_scope
from segq.errors import InputError, TransientError
from segq.models import Dataset, Job, Status
from segq.modelspec import ModelSpec, file_sha256
from segq.settings import get_settings
from segq.volumes import read_header

logger = logging.getLogger("segq.submit")


@dataclass(frozen=True)
class Submitted:
    dataset_id: str
    job_ids: list[str]


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


def send_job(job_id: str, priority: str = "normal") -> None:
    get_app().send_task(SEGMENT_VOLUME, args=(job_id,), queue=queue_for(COORDINATOR_QUEUE, priority))


def submit(inputs: list[Input], out_dir: Path, spec: ModelSpec, *, name: str | None = None,
           priority: str = "normal", max_windows_per_subtask: int | None = None,
           save_probabilities: bool = False) -> Submitted:
    """Write one dataset row and a job row per input, then queue them. Nothing is queued if a header is bad."""
    settings = get_settings()
    for item in inputs:
        read_header(item.path, settings.max_voxels)
    check_broker()
    ensure_schema()
    model_sha = spec.checksum()
    params = {**spec.params(), "model": spec.to_dict(), "priority": priority,
              "max_windows_per_subtask": max_windows_per_subtask, "save_probabilities": save_probabilities}
    hashes = {item.path: file_sha256(item.path) for item in inputs}
    out_dir = out_dir.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with session_scope() as s:
        dataset = Dataset(name=name or out_dir.name, out_dir=str(out_dir), model_path=str(spec.path),
                          model_sha256=model_sha, params=params, priority=priority)
        s.add(dataset)
        s.flush()
        rows = [Job(dataset_id=dataset.id, input_path=str(item.path), input_sha256=hashes[item.path],
                    fingerprint=fingerprint(hashes[item.path], model_sha, spec.params()),
                    output_path=str(item.output), status=Status.QUEUED) for item in inputs]
        s.add_all(rows)
        s.flush()
        submitted = Submitted(dataset.id, [row.id for row in rows])
    for job_id in submitted.job_ids:
        send_job(job_id, priority)
    logger.info("dataset %s: queued %d volume(s)", submitted.dataset_id, len(submitted.job_ids))
    return submitted


__all__ = ["submit", "Submitted", "fingerprint", "check_broker", "send_job", "InputError"]
