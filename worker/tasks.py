"""Celery tasks: each is a step of a job, run by worker.steps.run_step, which owns the error policy.

prepare (``segment_volume``, coordinator) loads and plans a volume admitted by segq/scheduler.py and
sends its GPU parts; ``infer_slab`` (gpu) runs one part on the device; ``merge`` (finish queue, polled
before the prepare queue) writes the mask, closes the job and lets the next volume in.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from celery import Task, chord, signature
from celery.signals import task_prerun, task_revoked, worker_init

from segq import clock, db, faults, records, scheduler, sharedstorage, storage
from segq.celery_app import app
from segq.errors import CancelledError, StorageNotSharedError
from segq.models import Status
from segq.modelspec import spec_from_dict
from segq.names import (
    FINISH_QUEUE,
    GPU_QUEUE,
    INFER,
    JOB_FAILED,
    MERGE,
    PREPARE,
    RECORD_FAILURE,
    merge_task_id,
    queue_for,
    slab_task_id,
)
from segq.settings import get_settings
from worker import jobs, leaving
from worker.steps import Step, discard, run_step

logger = logging.getLogger("segq.tasks")

CANCEL_POLL_SECONDS = 2.0


def dispatch(job: records.JobView, n_slabs: int) -> None:
    """Send the job's parts to the GPU queue, collected by ``merge``: a flat chord, or one chain."""
    priority = str(job.params.get("priority", "normal"))
    gpu_q, finish_q = queue_for(GPU_QUEUE, priority), queue_for(FINISH_QUEUE, priority)
    on_error = signature(JOB_FAILED, args=(job.id, job.attempt), queue=finish_q)
    body = signature(MERGE, args=(job.id, job.attempt), queue=finish_q).on_error(on_error)
    body.set(task_id=merge_task_id(job.id, job.attempt))
    # Known ids (job, attempt, slab): `segq cancel` revokes them without having stored them.
    header = [signature(INFER, args=(job.id, job.attempt, k), queue=gpu_q, immutable=True)
              .set(task_id=slab_task_id(job.id, job.attempt, k)) for k in range(n_slabs)]
    if n_slabs == 1:
        (header[0].on_error(on_error) | body).apply_async()
    else:
        chord(header)(body)


@task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, **_kwargs: Any) -> None:
    """A revoked slab (``segq cancel``) never runs, so neither would its cleanup: delete its workspace here.

    Runs in the worker's main process, which must not open database connections its forked children
    could inherit; it needs none: an attempt missing a slab can never merge, so its workspace is dead.
    """
    args = list(getattr(request, "args", None) or ())
    if getattr(sender, "name", None) == INFER and len(args) >= 2:
        discard(str(args[0]), int(args[1]))


@worker_init.connect
def preload_heavy_modules(**_: Any) -> None:
    """Import torch, MONAI and the engines in the worker's parent, before it forks its pool.

    Each pool process then starts with them loaded (copy-on-write) instead of paying several seconds
    of imports on its first task, which a dataset's first volumes would otherwise wait for. Importing
    torch does not initialise CUDA, so the parent still never holds a CUDA context. A simulated worker
    (SEGQ_BACKEND=simulate, test only) imports what prepare and merge use, not the networks and engines.
    """
    import monai.data.utils  # noqa: F401
    import torch  # noqa: F401

    if get_settings().backend == "simulate":
        return
    import monai.inferers.utils  # noqa: F401
    import monai.networks.nets  # noqa: F401

    import worker.engines.inference  # noqa: F401
    import worker.engines.torch_engine  # noqa: F401


@task_prerun.connect
def share_the_cores(**_: Any) -> None:
    """Before each task of a plain worker (registered in worker/threads.py): torch's threads to this process's share
    of the host's cores, read again each time, as workers come and go."""
    from worker import threads

    if threads.registered_here():
        threads.apply()


def _worker(task: Task) -> str:
    return task.request.hostname or "unknown"


@app.task(name=PREPARE, bind=True)
def segment_volume(self: Task, job_id: str, attempt: int | None = None) -> dict[str, Any] | None:
    return run_step(self, Step("preparing the volume", job_id, attempt), lambda job: _prepare(self, job))


def _parts_for(job: records.JobView) -> Any:
    """The split rule (segq/scheduler.py) for this job, given the GPUs present and the volumes waiting."""
    settings = get_settings()
    cap = jobs.window_cap(job, settings)
    sw_batch = int(job.model.get("sw_batch_size") or 4)
    # A bundle's volume in one part is preprocessed on its GPU worker in milliseconds, split on the coordinator's CPU
    # in seconds, and its partials keep no running sum: a lone bundle volume is not split for streaming's sake.
    lone = 1 if job.model.get("format") == "bundle" else settings.lone_parts

    def parts(windows: int) -> int:
        gpus, waiting = scheduler.gpu_workers(settings), scheduler.backlog(exclude=job.id)
        n = scheduler.split_parts(windows, gpus, waiting, 2 * sw_batch, cap, lone)
        logger.info("job %s: %d windows in %d part(s): %d GPU worker(s), %d other volume(s) waiting", job.id,
                    windows, n, gpus, waiting)
        return n

    return parts


def _prepare(task: Task, job: records.JobView) -> dict[str, Any]:
    settings = get_settings()
    watch = clock.Stopwatch()
    _require_shared_storage(task, settings.storage_root)
    prepared = jobs.prepare(job, settings, _parts_for(job))
    counts = [len(s.starts) for s in prepared.slabs]
    phases = clock.Phases()
    if not records.record_plan(job.id, job.attempt, shape=prepared.shape, spacing=prepared.spacing,
                               windows=len(prepared.plan.starts), slab_windows=counts,
                               preprocess_seconds=round(prepared.seconds, 3), backend=settings.backend,
                               precision=settings.precision):
        raise CancelledError("the job ended while its volume was prepared")
    phases.mark("plan recorded")
    dispatch(job, len(prepared.slabs))
    phases.mark("parts sent")
    if prepared.stream is not None:  # the parts are on their way: each starts as soon as its rows are written
        prepared.stream(_cancel_check(job.id, job.attempt))
        phases.mark("rows streamed")
    logger.info("job %s after prepare: %s", job.id, phases.line())
    records.record_step(job.id, job.attempt, "prepare", _worker(task), watch.span(), windows=len(prepared.plan.starts))
    return {"job": job.id, "windows": len(prepared.plan.starts), "subtasks": len(prepared.slabs)}


def _require_shared_storage(task: Task, root: Path) -> None:
    """A workspace written where the other workers cannot see it would fail the job at its first part elsewhere:
    StorageNotSharedError (the step runner hands the message back and stops this worker) when ``root`` is not the
    storage they share."""
    client = getattr(task.backend, "client", None)
    reason = sharedstorage.problem(client, root, _worker(task)) if client is not None else None
    if reason is not None:
        raise StorageNotSharedError(reason)


def _cancel_check(job_id: str, attempt: int) -> Any:
    last = [0.0, False]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last[0] >= CANCEL_POLL_SECONDS:
            state = records.job_status(job_id)
            last[0], last[1] = now, state is None or state[1] != attempt or state[0].final
        return bool(last[1])

    return should_stop


def _stop_check(job: records.JobView, ws: Path, slab: int, batch_size: int) -> Any:
    """What a part asks before each ROI batch: is the job still wanted (False stops it), and may this worker,
    if it is leaving, still finish it within the grace (WorkerLeaving hands it back, worker/leaving.py)."""
    _plan, slabs = jobs.load_plan(ws)
    windows = len(slabs[slab].starts) if 0 <= slab < len(slabs) else 0
    pace = leaving.PartClock(-(-windows // max(batch_size, 1)))
    cancelled = _cancel_check(job.id, job.attempt)

    def should_stop() -> bool:
        pace()
        return bool(cancelled())

    return should_stop


@app.task(name=INFER, bind=True)
def infer_slab(self: Task, job_id: str, attempt: int, slab: int,
               batch_size: int | None = None) -> dict[str, Any] | None:
    step = Step(f"slab {slab}", job_id, attempt, part=slab, batch_size=batch_size)
    return run_step(self, step, lambda job: _infer(self, job, step))


def _infer(task: Task, job: records.JobView, step: Step) -> dict[str, Any]:
    settings = get_settings()
    worker, slab = _worker(task), int(step.part or 0)
    ws = storage.require_workspace(storage.workspace(settings.storage_root, job.id, job.attempt), worker)
    done = records.subtask_done(job.id, job.attempt, slab) and jobs.existing_reference(ws, slab, worker)
    if done:
        jobs.add_to_sum(ws, done)  # a delivery killed after its subtask was recorded: the add is idempotent
        return done
    if settings.backend == "simulate":  # TEST ONLY: sleep for the GPU time (bench/simulate.py)
        from worker.simulate import run_part

        watch = clock.Stopwatch()
        _plan, slabs = jobs.load_plan(ws)
        jobs.wait_for_input(ws, slabs[slab], _cancel_check(job.id, job.attempt), settings.stream_stall_seconds)
        ref, held = run_part(ws, slab, worker, settings.simulate_seconds_per_window)
        jobs.add_to_sum(ws, ref)
        records.finish_subtask(job.id, job.attempt, slab, (held[1] - held[0]).total_seconds(), 0)
        records.record_step(job.id, job.attempt, "infer", worker, watch.span(), part=slab, device="simulated",
                            busy=held, windows=ref["windows"])
        return ref
    from worker.runtime import DeviceLease, engine_for
    spec, engine = engine_for(job.model, job.model_sha256, settings, step.batch_size, worker)
    step.batch_size = spec.sw_batch_size
    watch = clock.Stopwatch()
    lease = DeviceLease(engine)
    ref = jobs.run_slab(ws, slab, engine, spec, step.batch_size, worker, _stop_check(job, ws, slab, step.batch_size),
                        lease, settings.partial_dtype, _cancel_check(job.id, job.attempt),
                        settings.stream_stall_seconds)
    jobs.add_to_sum(ws, ref)  # before the part is recorded done and counted by the chord: merge finds it added
    records.finish_subtask(job.id, job.attempt, slab, round(watch.seconds(), 3), step.batch_size, lease.peak_bytes)
    records.record_step(job.id, job.attempt, "infer", worker, watch.span(), part=slab, device=lease.label,
                        busy=lease.interval, windows=ref.get("windows"))
    return ref


@app.task(name=MERGE, bind=True)
def merge(self: Task, refs: list[dict[str, Any]] | dict[str, Any] | None, job_id: str,
          attempt: int) -> dict[str, Any] | None:
    step = Step("merge", job_id, attempt, writes_output=True)
    return run_step(self, step, lambda job: _merge(self, job, refs))


def _merge(task: Task, job: records.JobView, refs: list[dict[str, Any]] | dict[str, Any] | None) -> dict[str, Any]:
    settings = get_settings()
    watch = clock.Stopwatch()
    ws = storage.require_workspace(storage.workspace(settings.storage_root, job.id, job.attempt), _worker(task))
    parts = refs if isinstance(refs, list) else [refs] if refs else []
    jobs.check_output(job, settings)
    result = jobs.merge(ws, parts, Path(job.input_path), Path(job.output_path),
                        bool(job.params.get("save_probabilities")), spec_from_dict(job.model))
    voxels, ml = result.voxels, result.ml
    faults.point("before_merge_finish", output=Path(job.output_path).name)
    if not records.finish_job(job.id, job.attempt, tumour_voxels=voxels, tumour_ml=ml,
                              merge_seconds=round(watch.seconds(), 3), labels=result.labels):
        # Cancelled or failed while merging: the step runner removes every output written (steps._drop_outputs).
        raise CancelledError("the job ended while it was merged")
    storage.remove_tree(storage.job_dir(settings.storage_root, job.id))
    records.record_step(job.id, job.attempt, "merge", _worker(task), watch.span())
    scheduler.admit_quietly()  # a volume finished: its room goes to the next one waiting
    return {"job": job.id, "output": job.output_path, "tumour_voxels": voxels, "tumour_ml": ml}


@app.task(name=JOB_FAILED)
def job_failed(request: Any, exc: Any, traceback: Any, job_id: str, attempt: int) -> None:
    """Error callback of a job's chord: the first failure's reason is kept on the job row.

    Celery calls it in the process where the part failed, once: with the database away it hands the work to a
    :func:`record_failure` message, which waits for the database under the step runner's policy."""
    reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    try:
        _record_failure(job_id, attempt, reason)
    except Exception as error:
        if not db.unavailable(error):
            raise
        db.note_outage(error)
        app.send_task(RECORD_FAILURE, args=(job_id, attempt, reason), queue=FINISH_QUEUE)


@app.task(name=RECORD_FAILURE, bind=True)
def record_failure(self: Task, job_id: str, attempt: int, reason: str) -> None:
    """The chord error callback's work, sent when the database could not be reached from the callback."""
    run_step(self, Step("recording the failure", job_id, attempt), lambda job: _record_failure(job.id, job.attempt,
                                                                                               reason))


def _record_failure(job_id: str, attempt: int, reason: str) -> None:
    records.fail_job(job_id, reason, attempt)
    discard(job_id, attempt)
    scheduler.admit_quietly()


__all__ = ["segment_volume", "infer_slab", "merge", "job_failed", "record_failure", "dispatch", "Status"]
