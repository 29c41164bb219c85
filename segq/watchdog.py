"""The watchdog: a job still running past ``SEGQ_JOB_DEADLINE`` is failed with the reason, so nothing hangs.

A chord whose subtask message was lost (a Redis without AOF restarted, a key evicted, a bug) never fires
its merge: the job would stay "running" for ever and `segq submit --wait` with it. Each worker sweeps
every ``SEGQ_WATCHDOG_INTERVAL`` seconds (a timer in its main process), and `segq watchdog` runs the
same sweep on its own. Failing is idempotent (the first reason wins), so several sweepers are harmless;
`segq retry` queues such a job again. Queued jobs are not aged: they wait their turn behind the others.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
from celery import bootsteps
from sqlalchemy import select

from segq import records, storage
from segq.db import get_engine, log_failure, session_scope
from segq.models import Job, Status, utcnow
from segq.settings import Settings, get_settings

logger = logging.getLogger("segq.watchdog")


@dataclass(frozen=True)
class Stuck:
    job_id: str
    attempt: int
    running_seconds: float
    output_path: str


def stuck_jobs(deadline_seconds: int, now: datetime | None = None) -> list[Stuck]:
    """Running jobs whose attempt started more than ``deadline_seconds`` ago."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=deadline_seconds)
    with session_scope() as s:
        rows = s.execute(select(Job.id, Job.attempt, Job.started_at, Job.output_path)
                         .where(Job.status == Status.RUNNING, Job.started_at.is_not(None)))
        return [Stuck(job_id, attempt, (now - started).total_seconds(), output)
                for job_id, attempt, started, output in rows if started is not None and started < cutoff]


def sweep(settings: Settings | None = None, now: datetime | None = None) -> list[str]:
    """Fail every job running past the deadline and delete what it left; returns the ids failed now."""
    settings = settings or get_settings()
    failed = []
    for job in stuck_jobs(settings.job_deadline, now):
        reason = (f"stuck: running for {job.running_seconds / 60:.0f} min, past the deadline of "
                  f"{settings.job_deadline / 60:.0f} min (SEGQ_JOB_DEADLINE): a subtask or its merge never "
                  "finished (a worker or Redis lost it); `segq retry` queues it again")
        if records.fail_job(job.job_id, reason, job.attempt):
            storage.remove_workspace(settings.storage_root, job.job_id, job.attempt)
            storage.remove_stale_temps(Path(job.output_path))  # hours old: no live merge owns it
            failed.append(job.job_id)
    return failed


def sweep_quietly() -> None:
    """One sweep from a worker's timer: logs instead of raising, and keeps no database connection open
    (the worker's main process forks pool processes, which must not inherit one)."""
    try:
        failed = sweep()
        if failed:
            logger.warning("watchdog failed %d stuck job(s): %s", len(failed), ", ".join(failed))
    except Exception:  # the database is away for a moment: the next sweep tries again
        log_failure(logger, "watchdog sweep failed")
    finally:
        get_engine().dispose()


def consumes_gpu_queue(queues: Any) -> bool:
    """True when a worker consuming ``queues`` (names) runs GPU parts: it counts as a GPU for the scheduler."""
    from segq.names import GPU_QUEUE

    return any(q == GPU_QUEUE or q.startswith(GPU_QUEUE + ".") for q in queues)


def beat(worker: str | None) -> None:
    """One tick of a worker's scheduler timer: say this GPU worker is alive, then admit what there is room for.

    Steps admit as they end; this is the safety net for a trigger that was lost (a process killed after
    a job ended) and what grows the window when a GPU worker joins. Logs instead of raising.
    """
    from segq import scheduler

    try:
        if worker:
            scheduler.heartbeat(worker)
        if scheduler.release_stale_admissions():
            logger.warning("gave back the room of volumes admitted long ago that never started")
        scheduler.admit_quietly()
    except Exception:  # Redis or the database away for a moment: the next tick tries again
        log_failure(logger, "scheduler heartbeat failed")
    finally:
        get_engine().dispose()


class Periodic:
    """Call ``fn`` every ``interval`` seconds in a daemon thread of its own, until stopped.

    Not on the worker's timer: in a prefork worker that timer runs in the event loop that fetches
    messages, so a sweep that waits (a 2 s ping, a slow database) held every queue of the worker still
    (seen on a GPU machine: merges delayed 2 s every 30 s, the GPU idle meanwhile).
    """

    def __init__(self, interval: float, fn: Any, *args: Any) -> None:
        self.interval, self.fn, self.args = interval, fn, args
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"segq-{getattr(fn, '__name__', 'periodic')}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.fn(*self.args)

    def cancel(self) -> None:
        self.stopped.set()


class SchedulerStep(bootsteps.StartStopStep):
    """A worker bootstep: heartbeat (GPU workers) and admission every ``SEGQ_ADMIT_INTERVAL`` seconds."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Periodic | None = None
        self.worker: str | None = None

    def start(self, parent: Any) -> None:
        queues = list(parent.app.amqp.queues.consume_from or parent.app.amqp.queues)
        self.worker = parent.hostname if consumes_gpu_queue(queues) else None
        beat(self.worker)
        self.tref = Periodic(get_settings().admit_interval, beat, self.worker)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.worker:
            from segq import scheduler

            try:
                scheduler.forget_worker(self.worker)
            except Exception:
                logger.warning("could not take %s out of the GPU worker count; it goes stale by itself", self.worker)


class IncarnationStep(bootsteps.StartStopStep):
    """A worker bootstep, before the consumer takes any message: announce this start of the worker in Redis and
    take back whatever an earlier start under the same name left running (segq/incarnation.py). A worker killed
    and started again under its old name (systemd, a StatefulSet, the launcher) would otherwise answer the
    others' pings for the dead process, and its parts would wait for the visibility timeout."""

    def start(self, parent: Any) -> None:
        from segq import deadworkers, incarnation

        token = incarnation.current()
        if token is None:
            return
        try:
            with parent.app.connection_for_write() as connection:
                incarnation.announce(connection.default_channel.client, parent.hostname, token)
            deadworkers.take_back(parent.hostname, "was started again (its earlier process, which ran it, is gone)",
                                  keep=token)
        except Exception:  # Redis or the database away at the start: the sweeps take it back later
            logger.exception("could not take back what an earlier start of %s left running", parent.hostname)
        finally:
            get_engine().dispose()


class WatchdogStep(bootsteps.StartStopStep):
    """A worker bootstep: sweep for stuck jobs every ``SEGQ_WATCHDOG_INTERVAL`` seconds, and for subtasks of
    dead workers every ``SEGQ_DEAD_WORKER_INTERVAL`` seconds (segq.deadworkers), each in a thread (Periodic)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.trefs: list[Periodic] = []

    def start(self, parent: Any) -> None:
        from segq.deadworkers import DeadWorkerSweep

        settings = get_settings()
        if settings.watchdog_interval:
            self.trefs.append(Periodic(settings.watchdog_interval, sweep_quietly))
        if settings.dead_worker_interval:  # subtasks of workers killed whole: re-queued in about two intervals
            dead = DeadWorkerSweep(parent.app, parent.hostname)
            self.trefs.append(Periodic(settings.dead_worker_interval, dead))

    def stop(self, parent: Any) -> None:
        for tref in self.trefs:
            tref.cancel()
        self.trefs.clear()


@click.command()
@click.option("--once", is_flag=True, help="Sweep once and exit (for cron), instead of every --interval seconds.")
@click.option("--interval", type=click.IntRange(min=1), default=None,
              help="Seconds between sweeps (default: SEGQ_WATCHDOG_INTERVAL, else 300).")
def watchdog(once: bool, interval: int | None) -> None:
    """Fail jobs running past SEGQ_JOB_DEADLINE, with the reason, and delete what they left behind."""
    from segq.db import ensure_schema

    ensure_schema()
    settings = get_settings()
    every = interval or settings.watchdog_interval or 300
    while True:
        failed = sweep(settings)
        for job_id in failed:
            click.echo(f"job {job_id}: failed, running past the deadline of {settings.job_deadline} s")
        if once:
            click.echo(f"watchdog: {len(failed)} stuck job(s) failed")
            return
        time.sleep(every)
