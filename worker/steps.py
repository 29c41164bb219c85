"""The step runner: the one place that decides what a failure means, for every task.

Every task is a step of a job (prepare, infer a part, merge) and calls :func:`run_step` with a body.
The runner drops stale messages (an earlier attempt, a job that ended), counts deliveries in one store
(Redis, per message and retry) so a step that kills its process every time cannot loop for ever, and
maps whatever the body raised to one outcome through :data:`POLICY`:

==============================  ==========  ===========================================================
error                           outcome     what happens
==============================  ==========  ===========================================================
CancelledError                  DISCARD     the job ended meanwhile: delete the workspace, record nothing
TransientError                  RETRY       run again after a backoff slept here (no ETA), at most
(StreamStalledError: a part's               SEGQ_MAX_RETRIES times, then FAIL
streamed rows stopped coming)
db.UNAVAILABLE (a lost          RECONNECT   wherever in the step (loading the job, the body, recording a
database: OperationalError ...)             failure): wait 1, 2, 4, then 5 s here and run it again, up to
                                            SEGQ_DB_OUTAGE_LIMIT; one log line an outage, no traceback
torch.OutOfMemoryError          SHRINK      retry the part with half the ROI batch (at 1 ROI: RETRY)
EngineError, a broken device    EXIT        hand the message back and end this process (exit code 70)
EngineRefusedError              EXIT        the same, exit code 78: the launcher does not restart it (the
                                            accuracy gate refused the engine; a new process builds the same)
StorageNotSharedError           STOP        this worker's SEGQ_STORAGE is not the shared one: hand the message
                                            back and stop the whole worker, exit code 78 (a worker on the shared
                                            storage that misses a workspace fails the job instead)
WorkerLeaving                   HAND_BACK   the worker is leaving (SIGTERM) and the part would not end within
                                            SEGQ_STOP_GRACE: the message goes back to the queue, this delivery
                                            uncounted, the part waits again (worker/leaving.py)
InputError, MemoryError, other  FAIL        fail the job with the reason, delete its workspace; the worker
                                            lives on (a volume too large for the host fails alone)
==============================  ==========  ===========================================================

A new error class gets its outcome with one line in :data:`POLICY`.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Reject, WorkerShutdown
from celery.worker.control import control_command

from segq import db, incarnation, records, scheduler, sharedstorage, storage
from segq.errors import (
    CancelledError,
    EngineError,
    EngineRefusedError,
    InputError,
    StorageNotSharedError,
    TransientError,
    WorkerLeaving,
)
from segq.names import DELIVERIES_KEY, EXIT_CONFIG, EXIT_ENGINE_BROKEN, every_queue
from segq.settings import get_settings
from worker import leaving
from worker.jobs import outputs_of

logger = logging.getLogger("segq.steps")

T = TypeVar("T")


class Outcome(enum.Enum):
    DISCARD = "discard"
    RETRY = "retry"
    SHRINK = "shrink"
    EXIT = "exit"
    STOP = "stop"
    HAND_BACK = "hand_back"
    FAIL = "fail"
    RECONNECT = "reconnect"


# First match wins; anything not listed is FAIL, unless it leaves the device unusable (EXIT).
POLICY: tuple[tuple[type[BaseException], Outcome], ...] = (
    (CancelledError, Outcome.DISCARD),
    (WorkerLeaving, Outcome.HAND_BACK),
    (TransientError, Outcome.RETRY),
    *((cls, Outcome.RECONNECT) for cls in db.UNAVAILABLE),  # refined by db.unavailable (SQLite's schema errors)
    (EngineError, Outcome.EXIT),
    (StorageNotSharedError, Outcome.STOP),
    (InputError, Outcome.FAIL),
    (MemoryError, Outcome.FAIL),
)

# What a CUDA context that can no longer run anything raises (an illegal access, a device-side assert, a
# failed library handle): every later call fails too, so the process must go, not the job.
DEVICE_BROKEN = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert")
# Time for the worker to hand the message back and stop consuming before the process ends: longer than kombu's
# Redis BRPOP timeout (1 s), so a message popped meanwhile is recorded as unacked (and comes back) rather than lost.
EXIT_DELAY_SECONDS = 2.0
# Every backoff between two tries of a step is slept in this process, and the retry sent with countdown=0 (no ETA):
# a countdown becomes an ETA on the sending worker's clock, which the worker that fetches the retry compares with
# its own: one 10 minutes behind would hold the retry 10 minutes (segq/clock.py). The cap while the database is away:
DB_BACKOFF_CAP_SECONDS = 5.0


@dataclass
class Step:
    """One delivery of one step of a job. ``what`` names it in errors ("slab 2", "merge")."""

    what: str
    job_id: str
    attempt: int | None
    part: int | None = None
    batch_size: int | None = None  # infer: the ROI batch this delivery runs (SHRINK halves it)
    writes_output: bool = False  # merge: the job's output's stale temp files go when the step is given up
    output: str = ""


def _torch() -> Any:
    return sys.modules.get("torch")  # only a process that imported torch can have raised its errors


def device_oom(exc: BaseException) -> bool:
    torch = _torch()
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def device_broken(exc: BaseException) -> bool:
    """True for an error that leaves this process's device unusable (out of memory is not one)."""
    torch = _torch()
    if torch is None:
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and not device_oom(exc) and any(m in str(exc) for m in DEVICE_BROKEN)


def outcome(exc: BaseException) -> Outcome:
    """What the runner does about ``exc``."""
    for cls, result in POLICY:
        if isinstance(exc, cls):
            return Outcome.FAIL if result is Outcome.RECONNECT and not db.unavailable(exc) else result
    if device_oom(exc):
        return Outcome.SHRINK
    return Outcome.EXIT if device_broken(exc) else Outcome.FAIL


def describe(exc: BaseException) -> str:
    """The reason stored on the job: our own errors speak for themselves, others carry their class."""
    if isinstance(exc, InputError | TransientError | EngineError | WorkerLeaving):
        return str(exc)
    if isinstance(exc, MemoryError):
        return (f"out of host memory ({exc or 'MemoryError'}): this volume needs more memory than this worker "
                "may use; give the worker more memory (ulimit -v, container limit) or split the volume")
    return f"{type(exc).__name__}: {exc}"


_broken = threading.Event()  # set once this process's device is unusable: no further step may run here


def discard(job_id: str, attempt: int) -> None:
    """Delete the workspace of an attempt that ended (cancelled, failed, superseded): nothing is left behind."""
    storage.remove_workspace(get_settings().storage_root, job_id, attempt)


def _deliveries(task: Task) -> int:
    """Count this delivery of the message in Redis; 1 on a backend without a Redis client.

    A process killed mid-task gets its message redelivered with the same id and retry count, so
    (id, retries) counts deliveries, not the step's own bounded retries.
    """
    client = getattr(task.backend, "client", None)
    if client is None:
        return 1
    key = DELIVERIES_KEY.format(task_id=task.request.id, retries=task.request.retries or 0)
    count = int(client.incr(key))
    client.expire(key, get_settings().result_expires)
    return count


def run_step(task: Task, step: Step, body: Callable[[records.JobView], T]) -> T | None:
    """Run ``body(job)`` for ``step`` under the one policy; returns its result, or None when it did not run."""
    if _broken.is_set():
        raise Reject("this process's device is broken; another worker takes the message", requeue=True)
    if leaving.leaving():  # fetched as the worker was told to go: it never starts here
        logger.info("%s of job %s: this worker is leaving; handed back before it started", step.what, step.job_id)
        raise Reject("this worker is leaving; another worker takes the message", requeue=True)
    try:
        return _run(task, step, body)
    except Exception as exc:  # a lost database anywhere in the step, its failure handling included
        if outcome(exc) is not Outcome.RECONNECT:
            raise
        _reconnect(task, step, exc)
        return None


def _run(task: Task, step: Step, body: Callable[[records.JobView], T]) -> T | None:
    job = records.load_job(step.job_id)
    if job is None or not job.active or (step.attempt is not None and step.attempt != job.attempt):
        if step.attempt is not None:
            discard(step.job_id, step.attempt)
        if job is not None and not job.active and step.writes_output:  # a merge killed after a write, then ended
            _drop_outputs(Step(step.what, job.id, job.attempt, output=job.output_path))
        return None
    step.attempt = job.attempt
    step.output = job.output_path if step.writes_output else ""
    deliveries = _deliveries(task)
    if step.part is not None:  # the subtask row shows every delivery (``segq metrics``), retries included
        records.start_subtask(job.id, job.attempt, step.part, task.request.hostname or "unknown",
                              incarnation.current())
    if deliveries > get_settings().max_deliveries:
        _fail(step, f"{step.what}: worker lost {deliveries - 1} times running it; giving up")
        return None
    try:
        return body(job)
    except Exception as exc:  # the one except chain of the task layer: POLICY decides
        _handle(task, step, exc)
        return None


def _handle(task: Task, step: Step, exc: Exception) -> None:
    """Carry out what POLICY says about ``exc``: returns (the message is done) or raises Retry or Reject."""
    result = outcome(exc)
    assert step.attempt is not None
    if result is Outcome.RECONNECT:
        raise exc  # run_step waits for the database and runs the whole step again
    if result is Outcome.DISCARD:
        discard(step.job_id, step.attempt)
        _drop_outputs(step)
        return
    if result is Outcome.HAND_BACK:
        _hand_back(task, step, exc)
    if result is Outcome.SHRINK:
        size = step.batch_size or 1
        if size > 1:
            _torch().cuda.empty_cache()
            logger.warning("%s of job %s: out of memory at batch %d, retrying at %d", step.what, step.job_id,
                           size, size // 2)
            time.sleep(1)  # the backoff here, not as a countdown (see DB_BACKOFF_CAP_SECONDS)
            raise task.retry(kwargs={**(task.request.kwargs or {}), "batch_size": size // 2}, countdown=0, exc=exc)
        result = Outcome.RETRY
    if result is Outcome.RETRY:
        retries = int(task.request.retries or 0)
        if retries < int(task.max_retries or 0):
            countdown = min(2 ** retries, 60)
            logger.warning("%s of job %s: %s; retry %d in %d s", step.what, step.job_id, describe(exc), retries + 1,
                           countdown)
            time.sleep(countdown)  # not as a countdown: its ETA would be read by another worker's clock
            raise task.retry(exc=exc, countdown=0)
        _fail(step, f"{step.what}: {describe(exc)} (still failing after {retries} retries)")
        return
    if result is Outcome.EXIT:
        _broken.set()
        refused = isinstance(exc, EngineRefusedError)  # a new process would build the same engine
        code = EXIT_CONFIG if refused else EXIT_ENGINE_BROKEN
        logger.critical("engine %s, ending this worker process %s (exit code %d): %s: %s",
                        "refused" if refused else "broken", "for good" if refused else "so a fresh one takes over",
                        code, step.what, describe(exc))
        stop_consuming(task)
        threading.Timer(EXIT_DELAY_SECONDS, os._exit, args=(code,)).start()
        raise Reject(describe(exc), requeue=True) from exc
    if result is Outcome.STOP and (reason := _not_shared(task)) is not None:
        logger.critical("%s of job %s handed back, stopping this worker (exit code %d): %s", step.what, step.job_id,
                        EXIT_CONFIG, reason)
        stop_worker(task, EXIT_CONFIG, reason)
        raise Reject(reason, requeue=True) from None
    _fail(step, f"{step.what}: {describe(exc)}")


def db_retries(limit_seconds: float) -> int:
    """How many tries of a step, DB_BACKOFF_CAP_SECONDS apart at most, fill ``limit_seconds`` of outage."""
    return max(1, math.ceil(limit_seconds / DB_BACKOFF_CAP_SECONDS) + 3)


def db_backoff(retries: int) -> float:
    """Seconds to wait before the try after ``retries`` earlier ones: 1, 2, 4, then the cap."""
    return float(min(2 ** min(retries, 16), DB_BACKOFF_CAP_SECONDS))


def _reconnect(task: Task, step: Step, exc: Exception) -> None:
    """The database is away: wait, then send the step again (the same task id, so a chord still counts it once).

    Logged once an outage (segq.db.note_outage); past SEGQ_DB_OUTAGE_LIMIT the step fails, where the failure can
    be recorded, and otherwise the watchdog's deadline or the stale-admission sweep takes the job back."""
    db.note_outage(exc)
    retries = int(task.request.retries or 0)
    budget = db_retries(get_settings().db_outage_limit)
    if retries >= budget:
        logger.error("%s of job %s: the database is still unreachable after %d tries; giving up on this message",
                     step.what, step.job_id, retries)
        if step.attempt is not None:
            _fail(step, f"{step.what}: the database was unreachable for over {get_settings().db_outage_limit} s "
                  f"(SEGQ_DB_OUTAGE_LIMIT): {db.describe_unavailable(exc)}; `segq retry --failed` queues it again")
        return
    time.sleep(db_backoff(retries))
    reason = TransientError(f"the database is unreachable ({db.describe_unavailable(exc)})")
    raise task.retry(exc=reason, countdown=0, max_retries=budget)


def _not_shared(task: Task) -> str | None:
    """Why this worker's storage is not the shared one; None when it is, or when Redis cannot tell."""
    client = getattr(task.backend, "client", None)
    if client is None:
        return None
    try:
        return sharedstorage.problem(client, get_settings().storage_root, task.request.hostname or "unknown")
    except Exception:  # the broker away: fail the job as before rather than guess
        logger.exception("could not compare this worker's storage with the shared one")
        return None


def stop_worker(task: Task, code: int, reason: str) -> None:
    """Ask this whole worker (its consumer, also from a prefork pool process) to stop taking messages and shut down
    with exit ``code`` (segq_stop below): its running tasks end, the messages it holds go back to the queues."""
    try:
        task.app.control.broadcast("segq_stop", arguments={"code": code, "reason": reason},
                                   destination=[task.request.hostname])
    except Exception:  # the broker away: the delivery count still bounds what this worker can take
        logger.exception("could not stop this worker")


@control_command(args=[("code", int), ("reason", str)], signature="<code> <reason>")
def segq_stop(state: Any, code: int = EXIT_CONFIG, reason: str = "", **_kwargs: Any) -> None:
    """Remote control, run by the worker's consumer: cancel every queue it consumes, then shut down (warm) with
    exit ``code``, which the launcher does not restart when it is EX_CONFIG."""
    consumer = state.consumer
    for queue in [q.name for q in consumer.task_consumer.queues]:
        consumer.cancel_task_queue(queue)
    logger.critical("worker stopping with exit code %d: %s", code, reason)
    _stopped_with.append(code)
    raise WorkerShutdown(code)


_stopped_with: list[int] = []  # what segq_stop asked this worker process to exit with


def stop_code() -> int:
    """The exit code segq_stop gave this worker (its main process), else 0: Celery's worker_main returns none."""
    return _stopped_with[-1] if _stopped_with else 0


def _hand_back(task: Task, step: Step, exc: Exception) -> None:
    """Give the message back to the queue without counting this delivery against the step (an orderly
    departure is not a worker lost), and let the part wait again; raises Reject."""
    assert step.attempt is not None
    client = getattr(task.backend, "client", None)
    if client is not None:
        client.decr(DELIVERIES_KEY.format(task_id=task.request.id, retries=task.request.retries or 0))
    if step.part is not None:
        records.hand_back_subtask(step.job_id, step.attempt, step.part)
    logger.warning("%s of job %s handed back: %s", step.what, step.job_id, describe(exc))
    raise Reject(describe(exc), requeue=True) from None  # orderly: no traceback in the log


def stop_consuming(task: Task) -> None:
    """Ask this worker to stop taking messages from every segq queue before its process ends (a threads or
    solo pool, where the task runs in the consumer's own process, as the launcher's device workers do).

    Without it the dying worker keeps fetching and handing back messages until the exit, and the exit can
    land between kombu's BRPOP and its unacked record, which loses that message (docs/RELIABILITY.md, 25
    and 26). The request goes through the broker to this worker's own consumer thread."""
    from billiard.process import current_process

    hostname = task.request.hostname
    if not hostname or current_process().name != "MainProcess":
        return  # a prefork pool child: its parent, the consumer, lives on and starts a new child
    try:
        for queue in every_queue():
            task.app.control.cancel_consumer(queue, destination=[hostname])
    except Exception:  # the broker away: the exit still happens; the delivery count bounds any loop
        logger.exception("could not stop consuming before the exit")


def _fail(step: Step, reason: str) -> None:
    """Fail the job (the first reason wins), delete what it left, and let a waiting volume take its room."""
    assert step.attempt is not None
    records.fail_job(step.job_id, reason, step.attempt)
    discard(step.job_id, step.attempt)
    _drop_outputs(step)
    scheduler.admit_quietly()


def _drop_outputs(step: Step) -> None:
    """A merge that ends without its job done takes every output it may have written with it (the mask, the
    probability map, the label sidecar, the DICOM SEG) and their temp files (no merge of this attempt runs again):
    an output exists only for a done job. Not when the job is done after all, or another live job now owns the path."""
    if not step.output or records.output_claimed(step.job_id, step.output):
        return
    for path in outputs_of(Path(step.output)):
        storage.remove_stale_temps(path)
        if path.exists():
            path.unlink(missing_ok=True)
            logger.warning("removed %s: its job %s ended during the merge", storage.printable(str(path)), step.job_id)
