"""Dead workers: a subtask running on a worker that no longer answers is re-queued within about a minute.

A worker killed whole (kill -9, a machine lost) leaves its messages in Redis's ``unacked`` hash until the
visibility timeout (2 h by default) brings them back. Each worker's main process instead pings the others
every ``SEGQ_DEAD_WORKER_INTERVAL`` seconds; a worker named on a running subtask that missed two pings in
a row is taken for dead, and each of its jobs starts a new attempt (``records.requeue_if``: the first
sweeper wins), which the scheduler sends as any queued volume. The old attempt's messages, when they
come back, find a newer attempt and do nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from segq import records, scheduler
from segq.db import get_engine

logger = logging.getLogger("segq.deadworkers")

PING_TIMEOUT = 2.0


def alive_workers(app: Any, me: str) -> set[str]:
    """Names of the workers that answered a ping, and ``me`` (whose own loop is busy sending it). A broker
    that is away raises instead, so an empty answer means that no other worker is there."""
    replies = app.control.ping(timeout=PING_TIMEOUT) or []
    return {name for reply in replies for name in reply} | {me}


class DeadWorkerSweep:
    """Holds the suspects of the last sweep: a worker is dead only after two sweeps in a row miss it."""

    def __init__(self, app: Any, me: str) -> None:
        self.app = app
        self.me = me
        self.suspects: set[str] = set()

    def __call__(self) -> list[str]:
        try:
            return self.sweep()
        except Exception:  # the broker or database is away for a moment: the next sweep tries again
            logger.exception("dead-worker sweep failed")
            return []
        finally:
            get_engine().dispose()  # the main process forks pool processes: keep no connection open

    def sweep(self) -> list[str]:
        alive = alive_workers(self.app, self.me)
        orphans = records.orphaned_subtasks(alive)
        missing = {worker for _job, _attempt, worker, _priority in orphans}
        dead, self.suspects = missing & self.suspects, missing
        requeued = []
        for job_id, attempt, worker, _priority in orphans:
            if worker not in dead:
                continue
            new = records.requeue_if(job_id, attempt)
            if new is None:
                continue  # another sweeper got there first, or the job ended
            logger.warning("job %s: worker %s stopped answering while running it; re-queued as attempt %d",
                           job_id, worker, new)
            requeued.append(job_id)
        if requeued:
            scheduler.admit()  # the new attempts wait in SQL like any queued volume; send what there is room for
        return requeued
