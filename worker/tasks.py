"""Celery tasks. Each is thin: it loads ids, calls worker.jobs, and records state in SQL.

Error policy (STYLE.md): InputError fails the job and is never retried; TransientError and CUDA
out-of-memory are retried with a bound (OOM with half the ROI batch); EngineError ends the worker
process so a fresh one takes over and the message is redelivered; anything else fails the job
with the error and the slab named.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from celery import Task, chord, signature

from segq import records, storage
from segq.celery_app import COORDINATOR_QUEUE, GPU_QUEUE, INFER_SLAB, JOB_FAILED, MERGE, SEGMENT_VOLUME, app, queue_for
from segq.errors import CancelledError, EngineError, InputError, TransientError
from segq.models import Status
from segq.settings import get_settings
from worker import jobs

logger = logging.getLogger("segq.tasks")

CANCEL_POLL_SECONDS = 2.0


def _priority(job: records.JobView) -> str:
    return str(job.params.get("priority", "normal"))


def dispatch(job: records.JobView, n_slabs: int) -> None:
    """Send the job's slabs to the GPU queue, collected by ``merge``: a flat chord, or one chain."""
    priority = _priority(job)
    gpu_q, coord_q = queue_for(GPU_QUEUE, priority), queue_for(COORDINATOR_QUEUE, priority)
    on_error = signature(JOB_FAILED, args=(job.id, job.attempt), queue=coord_q)
    body = signature(MERGE, args=(job.id, job.attempt), queue=coord_q).on_error(on_error)
    header = [signature(INFER_SLAB, args=(job.id, job.attempt, k), queue=gpu_q, immutable=True)
              for k in range(n_slabs)]
    if n_slabs == 1:
        (header[0].on_error(on_error) | body).apply_async()
    else:
        chord(header)(body)


def _exit_worker_process(reason: str) -> None:
    logger.critical("engine broken, ending this worker process so a fresh one takes over: %s", reason)
    os._exit(70)


@app.task(name=SEGMENT_VOLUME, bind=True, autoretry_for=(TransientError,), retry_backoff=True, retry_jitter=True)
def segment_volume(self: Task, job_id: str) -> dict[str, Any] | None:
    job = records.load_job(job_id)
    if job is None or not job.active:
        return None
    settings = get_settings()
    try:
        prepared = jobs.prepare(job, settings)
    except InputError as exc:
        records.fail_job(job_id, str(exc), job.attempt)
        storage.remove_tree(storage.workspace(settings.storage_root, job_id, job.attempt))
        return None
    counts = [len(s.starts) for s in prepared.slabs]
    if not records.record_plan(job_id, job.attempt, shape=prepared.shape, spacing=prepared.spacing,
                               windows=len(prepared.plan.starts), slab_windows=counts,
                               preprocess_seconds=round(prepared.seconds, 3), backend=settings.backend,
                               precision=settings.precision):
        return None
    dispatch(job, len(prepared.slabs))
    logger.info("job %s: %d windows in %d subtask(s)", job_id, len(prepared.plan.starts), len(prepared.slabs))
    return {"job": job_id, "windows": len(prepared.plan.starts), "subtasks": len(prepared.slabs)}


def _cancel_check(job_id: str, attempt: int) -> Any:
    last = [0.0, False]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last[0] >= CANCEL_POLL_SECONDS:
            state = records.job_status(job_id)
            last[0], last[1] = now, state is None or state[1] != attempt or state[0].final
        return bool(last[1])

    return should_stop


@app.task(name=INFER_SLAB, bind=True, autoretry_for=(TransientError,), retry_backoff=True, retry_jitter=True)
def infer_slab(self: Task, job_id: str, attempt: int, slab: int,
               batch_size: int | None = None) -> dict[str, Any] | None:
    job = records.load_job(job_id)
    if job is None or job.attempt != attempt or not job.active:
        return None
    settings = get_settings()
    worker = self.request.hostname or "unknown"
    deliveries = records.start_subtask(job_id, attempt, slab, worker)
    if deliveries > settings.max_deliveries:
        records.fail_job(job_id, f"slab {slab}: worker lost {deliveries - 1} times running it; giving up", attempt)
        return None
    ws = storage.workspace(settings.storage_root, job_id, attempt)
    try:
        storage.require_workspace(ws, worker)
        done = records.subtask_done(job_id, attempt, slab) and jobs.existing_reference(ws, slab, worker)
        if done:
            return done
        return _run_slab(self, job, ws, slab, batch_size, worker)
    except CancelledError:
        return None
    except InputError as exc:
        records.fail_job(job_id, f"slab {slab}: {exc}", attempt)
        raise
    except EngineError as exc:
        _exit_worker_process(str(exc))
        raise


def _run_slab(task: Task, job: records.JobView, ws: Path, slab: int, batch_size: int | None,
              worker: str) -> dict[str, Any]:
    import torch

    from worker.runtime import engine_for

    settings = get_settings()
    spec, engine = engine_for(job.model, job.model_sha256, settings)
    size = batch_size or spec.sw_batch_size
    started = time.perf_counter()
    try:
        ref = jobs.run_slab(ws, slab, engine, spec, size, worker, _cancel_check(job.id, job.attempt))
    except torch.OutOfMemoryError as exc:
        if size <= 1:
            raise TransientError(f"slab {slab}: out of memory even one ROI at a time") from exc
        torch.cuda.empty_cache()
        logger.warning("slab %d of job %s: out of memory at batch %d, retrying at %d", slab, job.id, size, size // 2)
        raise task.retry(kwargs={"batch_size": size // 2}, countdown=1, exc=exc) from exc
    except (InputError, CancelledError, EngineError, TransientError):
        raise
    except Exception as exc:
        records.fail_job(job.id, f"slab {slab}: {type(exc).__name__}: {exc}", job.attempt)
        raise
    records.finish_subtask(job.id, job.attempt, slab, round(time.perf_counter() - started, 3), size)
    return ref


@app.task(name=MERGE, bind=True, autoretry_for=(TransientError,), retry_backoff=True, retry_jitter=True)
def merge(self: Task, refs: list[dict[str, Any]] | dict[str, Any] | None, job_id: str,
          attempt: int) -> dict[str, Any] | None:
    job = records.load_job(job_id)
    if job is None or job.attempt != attempt or not job.active:
        return None
    settings = get_settings()
    ws = storage.workspace(settings.storage_root, job_id, attempt)
    parts = refs if isinstance(refs, list) else [refs] if refs else []
    started = time.perf_counter()
    try:
        storage.require_workspace(ws, self.request.hostname or "")
        voxels, ml = jobs.merge(ws, parts, Path(job.input_path), Path(job.output_path),
                                bool(job.params.get("save_probabilities")))
    except InputError as exc:
        records.fail_job(job_id, f"merge: {exc}", attempt)
        storage.remove_tree(ws)
        return None
    except Exception as exc:
        records.fail_job(job_id, f"merge: {type(exc).__name__}: {exc}", attempt)
        raise
    if not records.finish_job(job_id, attempt, tumour_voxels=voxels, tumour_ml=ml,
                              merge_seconds=round(time.perf_counter() - started, 3)):
        # Cancelled or failed while merging: an output must exist only for a job that is done.
        state = records.job_status(job_id)
        if state is None or state[0] != Status.DONE:
            Path(job.output_path).unlink(missing_ok=True)
        return None
    storage.remove_tree(storage.job_dir(settings.storage_root, job_id))
    return {"job": job_id, "output": job.output_path, "tumour_voxels": voxels, "tumour_ml": ml}


@app.task(name=JOB_FAILED)
def job_failed(request: Any, exc: Any, traceback: Any, job_id: str, attempt: int) -> None:
    """Error callback of a job's chord: the first failure's reason is kept on the job row."""
    reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    records.fail_job(job_id, reason, attempt)
    storage.remove_tree(storage.workspace(get_settings().storage_root, job_id, attempt))


__all__ = ["segment_volume", "infer_slab", "merge", "job_failed", "dispatch", "Status"]
