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
from celery.signals import task_revoked, worker_init

from segq import celery_app, records, storage, taskids
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
    body.set(task_id=taskids.merge_task_id(job.id, job.attempt))
    # Known ids (job, attempt, slab): `segq cancel` revokes them without having stored them.
    header = [signature(INFER_SLAB, args=(job.id, job.attempt, k), queue=gpu_q, immutable=True)
              .set(task_id=taskids.slab_task_id(job.id, job.attempt, k)) for k in range(n_slabs)]
    if n_slabs == 1:
        (header[0].on_error(on_error) | body).apply_async()
    else:
        chord(header)(body)


def _discard_workspace(job_id: str, attempt: int) -> None:
    """Delete the workspace of an attempt that ended (cancelled, failed, superseded): nothing is left behind."""
    storage.remove_workspace(get_settings().storage_root, job_id, attempt)


@task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, **_kwargs: Any) -> None:
    """A revoked slab (``segq cancel``) never runs, so neither would its cleanup: delete its workspace here.

    Runs in the worker's main process, which must not open database connections its forked children
    could inherit; it needs none: an attempt missing a slab can never merge, so its workspace is dead.
    """
    args = list(getattr(request, "args", None) or ())
    if getattr(sender, "name", None) == INFER_SLAB and len(args) >= 2:
        _discard_workspace(str(args[0]), int(args[1]))


# What a CUDA context that can no longer run anything raises (an illegal access, a device-side assert, a
# failed library handle): every later call fails too, so the process must go, not the job.
DEVICE_BROKEN = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert")


def device_broken(exc: BaseException) -> bool:
    """True for an error that leaves this process's device unusable (out of memory is not one)."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError) and any(
        marker in str(exc) for marker in DEVICE_BROKEN)


def _lost_too_often(task: Task, job_id: str, attempt: int, step: str, output: str = "") -> bool:
    """Count this delivery of a volume or merge task in Redis (slabs count theirs in SQL); past
    SEGQ_MAX_DELIVERIES fail the job, so a step that kills its process every time cannot loop for ever.

    A process killed mid-task gets its message redelivered with the same id and retry count, so
    (id, retries) counts deliveries and not the bounded TransientError retries.
    """
    client = getattr(task.backend, "client", None)
    if client is None:
        return False
    settings = get_settings()
    key = f"{celery_app.REDIS_KEY_PREFIX}deliveries:{task.request.id}:{task.request.retries}"
    deliveries = int(client.incr(key))
    client.expire(key, settings.result_expires)
    if deliveries <= settings.max_deliveries:
        return False
    records.fail_job(job_id, f"{step}: worker lost {deliveries - 1} times running it; giving up", attempt)
    _discard_workspace(job_id, attempt)
    if output:  # the killed merges' temp files: no merge of this attempt will run again
        storage.remove_stale_temps(Path(output))
    return True


def _exit_worker_process(reason: str) -> None:
    logger.critical("engine broken, ending this worker process so a fresh one takes over: %s", reason)
    os._exit(70)


@worker_init.connect
def preload_heavy_modules(**_: Any) -> None:
    """Import torch, MONAI and the engines in the worker's parent, before it forks its pool.

    Each pool process then starts with them loaded (copy-on-write) instead of paying several seconds
    of imports on its first task, which a dataset's first volumes would otherwise wait for. Importing
    torch does not initialise CUDA, so the parent still never holds a CUDA context.
    """
    import monai.data.utils  # noqa: F401
    import monai.inferers.utils  # noqa: F401
    import monai.networks.nets  # noqa: F401
    import torch  # noqa: F401

    import worker.engines.torch_engine  # noqa: F401
    import worker.inference  # noqa: F401


@app.task(name=SEGMENT_VOLUME, bind=True, autoretry_for=(TransientError,), retry_backoff=True, retry_jitter=True)
def segment_volume(self: Task, job_id: str, attempt: int | None = None) -> dict[str, Any] | None:
    job = records.load_job(job_id)
    # A message of an earlier attempt (resume, retry) is stale: the new attempt has its own message.
    if job is None or not job.active or (attempt is not None and attempt != job.attempt):
        return None
    if _lost_too_often(self, job_id, job.attempt, "preparing the volume"):
        return None
    settings = get_settings()
    try:
        prepared = jobs.prepare(job, settings)
    except InputError as exc:
        records.fail_job(job_id, str(exc), job.attempt)
        _discard_workspace(job_id, job.attempt)
        return None
    except TransientError:
        raise
    except Exception as exc:
        # A bug or an environment fault (disk full, permissions): fail the job with the reason rather
        # than leave it queued forever; the message is acknowledged as failed, never redelivered.
        records.fail_job(job_id, f"preparing the volume: {type(exc).__name__}: {exc}", job.attempt)
        _discard_workspace(job_id, job.attempt)
        raise
    counts = [len(s.starts) for s in prepared.slabs]
    if not records.record_plan(job_id, job.attempt, shape=prepared.shape, spacing=prepared.spacing,
                               windows=len(prepared.plan.starts), slab_windows=counts,
                               preprocess_seconds=round(prepared.seconds, 3), backend=settings.backend,
                               precision=settings.precision):
        _discard_workspace(job_id, job.attempt)  # cancelled while preparing
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
        _discard_workspace(job_id, attempt)
        return None
    settings = get_settings()
    worker = self.request.hostname or "unknown"
    deliveries = records.start_subtask(job_id, attempt, slab, worker)
    # Our own retries (out of memory: half the batch; transient errors) are counted by Celery, not as losses.
    lost = deliveries - 1 - int(self.request.retries or 0)
    if lost >= settings.max_deliveries:
        records.fail_job(job_id, f"slab {slab}: worker lost {lost} times running it; giving up", attempt)
        return None
    ws = storage.workspace(settings.storage_root, job_id, attempt)
    try:
        storage.require_workspace(ws, worker)
        done = records.subtask_done(job_id, attempt, slab) and jobs.existing_reference(ws, slab, worker)
        if done:
            return done
        return _run_slab(self, job, ws, slab, batch_size, worker)
    except CancelledError:
        _discard_workspace(job_id, attempt)
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

    from worker.runtime import engine_for, gpu_peak_bytes, reset_gpu_peak

    settings = get_settings()
    spec, engine = engine_for(job.model, job.model_sha256, settings)
    size = batch_size or spec.sw_batch_size
    reset_gpu_peak(engine)
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
        if device_broken(exc):  # the process goes and the slab is redelivered, bounded by max_deliveries
            raise EngineError(f"slab {slab}: {type(exc).__name__}: {exc}") from exc
        records.fail_job(job.id, f"slab {slab}: {type(exc).__name__}: {exc}", job.attempt)
        raise
    records.finish_subtask(job.id, job.attempt, slab, round(time.perf_counter() - started, 3), size,
                           gpu_peak_bytes(engine))
    return ref


@app.task(name=MERGE, bind=True, autoretry_for=(TransientError,), retry_backoff=True, retry_jitter=True)
def merge(self: Task, refs: list[dict[str, Any]] | dict[str, Any] | None, job_id: str,
          attempt: int) -> dict[str, Any] | None:
    job = records.load_job(job_id)
    if job is None or job.attempt != attempt or not job.active:
        _discard_workspace(job_id, attempt)
        return None
    if _lost_too_often(self, job_id, attempt, "merge", job.output_path):
        return None
    settings = get_settings()
    ws = storage.workspace(settings.storage_root, job_id, attempt)
    parts = refs if isinstance(refs, list) else [refs] if refs else []
    started = time.perf_counter()
    try:
        storage.require_workspace(ws, self.request.hostname or "")
        jobs.check_output(job, settings)
        voxels, ml = jobs.merge(ws, parts, Path(job.input_path), Path(job.output_path),
                                bool(job.params.get("save_probabilities")))
    except InputError as exc:
        records.fail_job(job_id, f"merge: {exc}", attempt)
        _discard_workspace(job_id, attempt)
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
            _discard_workspace(job_id, attempt)
        return None
    storage.remove_tree(storage.job_dir(settings.storage_root, job_id))
    return {"job": job_id, "output": job.output_path, "tumour_voxels": voxels, "tumour_ml": ml}


@app.task(name=JOB_FAILED)
def job_failed(request: Any, exc: Any, traceback: Any, job_id: str, attempt: int) -> None:
    """Error callback of a job's chord: the first failure's reason is kept on the job row."""
    reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    records.fail_job(job_id, reason, attempt)
    _discard_workspace(job_id, attempt)


__all__ = ["segment_volume", "infer_slab", "merge", "job_failed", "dispatch", "Status"]
