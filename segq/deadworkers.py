"""Dead workers and lost messages: a subtask running on a worker that no longer answers, or a part whose
message is nowhere, is re-queued within about a minute.

A worker killed whole (kill -9, a machine lost) leaves its messages in Redis's ``unacked`` hash until the
visibility timeout (2 h by default) brings them back. Each worker's main process instead pings the others
every ``SEGQ_DEAD_WORKER_INTERVAL`` seconds; a worker named on a running subtask that missed two pings in
a row is taken for dead, and each of its jobs starts a new attempt (``records.requeue_if``: the first
sweeper wins), which the scheduler sends as any queued volume. The old attempt's messages, when they
come back, find a newer attempt and do nothing.

One message such a kill can lose outright: kombu pops a message (BRPOP) before it records it in
``unacked``, and a kill between the two leaves it nowhere. So the same sweep also looks for the parts
(and due merges) that running jobs wait on whose message is in no queue and not in ``unacked``; missing
in two sweeps in a row, the job starts a new attempt the same way.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from segq import records, scheduler
from segq.db import get_engine, log_failure
from segq.names import every_queue, merge_task_id, slab_task_id

logger = logging.getLogger("segq.deadworkers")

PING_TIMEOUT = 2.0
UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, not yet acknowledged (segq acknowledges late)
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: a queue's per-priority lists are <queue><sep><priority>


def _message_id(raw: bytes | str) -> str | None:
    try:
        data = json.loads(raw)
        message = data[0] if isinstance(data, list) else data  # unacked holds [message, exchange, routing key]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def broker_task_ids(client: Any) -> set[str]:
    """Ids of every task message in the broker: waiting in a segq queue, or delivered and not acknowledged."""
    ids: set[str] = set()
    for queue in every_queue():
        for key in [queue, *client.scan_iter(match=f"{queue}{PRIORITY_SEP}*")]:
            ids.update(filter(None, map(_message_id, client.lrange(key, 0, -1))))
    ids.update(filter(None, map(_message_id, client.hvals(UNACKED_KEY))))
    return ids


def lost_messages(client: Any) -> set[tuple[str, int, str]]:
    """(job, attempt, task id) of each message a running job waits on that the broker does not hold.

    The broker is read before the database: a message sent after the read belongs to a row seen as
    waiting, and a row that changed meanwhile is seen in its newer state, so neither counts as lost."""
    present = broker_task_ids(client)
    lost: set[tuple[str, int, str]] = set()
    for job_id, attempt, waiting, subtasks in records.awaited_parts():
        expected = [slab_task_id(job_id, attempt, k) for k in waiting] if waiting else \
            [merge_task_id(job_id, attempt)] if subtasks else []
        lost.update((job_id, attempt, task_id) for task_id in expected if task_id not in present)
    return lost


def alive_workers(app: Any, me: str) -> set[str]:
    """Names of the workers that answered a ping, and ``me`` (whose own loop is busy sending it). A broker
    that is away raises instead, so an empty answer means that no other worker is there."""
    replies = app.control.ping(timeout=PING_TIMEOUT) or []
    return {name for reply in replies for name in reply} | {me}


class DeadWorkerSweep:
    """Holds the suspects of the last sweep: a worker is dead, or a message lost, only after two sweeps in a
    row miss it."""

    def __init__(self, app: Any, me: str) -> None:
        self.app = app
        self.me = me
        self.suspects: set[str] = set()
        self.lost_suspects: set[tuple[str, int, str]] = set()

    def __call__(self) -> list[str]:
        try:
            return self.sweep()
        except Exception:  # the broker or database is away for a moment: the next sweep tries again
            log_failure(logger, "dead-worker sweep failed")
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
        requeued += self.sweep_lost()
        if requeued:
            scheduler.admit()  # the new attempts wait in SQL like any queued volume; send what there is room for
        return requeued

    def sweep_lost(self) -> list[str]:
        """Start a new attempt of each running job whose awaited message was missing from the broker twice."""
        with self.app.connection_for_write() as connection:
            client = connection.default_channel.client
            missing = lost_messages(client)
        lost, self.lost_suspects = missing & self.lost_suspects, missing
        requeued = []
        for job_id, attempt, task_id in sorted(lost):
            new = records.requeue_if(job_id, attempt)
            if new is not None:
                logger.warning("job %s: the message of %s is in no queue and not delivered (lost by a worker killed "
                               "while fetching it); re-queued as attempt %d", job_id, task_id, new)
                requeued.append(job_id)
        return requeued
