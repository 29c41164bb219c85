"""Dead workers and lost messages: a subtask running on a worker that no longer answers, or a part whose
message is nowhere, is re-queued within about a minute.

A worker killed whole (kill -9, a machine lost) leaves its messages in Redis's ``unacked`` hash until the
visibility timeout (2 h by default) brings them back. Each worker's main process instead pings the others
every ``SEGQ_DEAD_WORKER_INTERVAL`` seconds; a worker named on a running subtask that missed two pings in
a row is taken for dead, and each of its jobs starts a new attempt (``records.requeue_if``: the first
sweeper wins), which the scheduler sends as any queued volume. The old attempt's delivered messages are
dropped from ``unacked`` (any that still came back would find a newer attempt and do nothing).

A worker restarted under its old name answers the pings for the dead process, so names alone cannot tell.
Each start of a worker has a token (segq/incarnation.py) recorded on the subtasks it runs: a new start takes
back what an earlier start of its name left running (``take_back``), the sweep takes a subtask whose token is
not its worker's latest for dead at once, and the launcher hands back the work of a child it saw die.

One message such a kill can lose outright: kombu pops a message (BRPOP) before it records it in
``unacked``, and a kill between the two leaves it nowhere. So the same sweep also looks for the parts
(and due merges) that running jobs wait on whose message is in no queue and not in ``unacked``; missing
in two sweeps in a row, the job starts a new attempt the same way.

A Redis restarted empty (no persistence, a failover, a flush) loses every message at once, the prepare
messages of jobs admitted but not started too. Those jobs are ``queued`` in SQL, with their room taken, so
no admission would send them again: the sweep looks for their prepare message as well, and a job whose
message is gone starts a new attempt (``records.readmit_if``), which the next admission sends.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from segq import incarnation, records, scheduler
from segq.celery_app import get_app
from segq.db import get_engine, log_failure
from segq.names import attempt_task_prefix, every_queue, merge_task_id, slab_task_id, volume_task_id

logger = logging.getLogger("segq.deadworkers")

PING_TIMEOUT = 2.0
UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, not yet acknowledged (segq acknowledges late)
UNACKED_INDEX_KEY = "unacked_index"  # ... and when each was delivered (what its visibility timeout restores by)
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


@dataclass(frozen=True, order=True)
class Awaited:
    """A message a job waits on: its prepare (admitted, not started) or a part's or its merge's (running)."""

    job_id: str
    attempt: int
    task_id: str
    started: bool


def awaited_messages() -> list[Awaited]:
    """Every message the admitted and running jobs wait on, as the database says now."""
    waiting = [Awaited(job_id, attempt, volume_task_id(job_id, attempt), False)
               for job_id, attempt in records.admitted_waiting()]
    for job_id, attempt, parts, subtasks in records.awaited_parts():
        ids = [slab_task_id(job_id, attempt, k) for k in parts] if parts else \
            [merge_task_id(job_id, attempt)] if subtasks else []
        waiting += [Awaited(job_id, attempt, task_id, True) for task_id in ids]
    return waiting


def lost_messages(client: Any) -> tuple[int, set[Awaited]]:
    """How many messages jobs wait on, and those of them the broker does not hold.

    The broker is read before the database: a message sent after the read belongs to a row seen as
    waiting, and a row that changed meanwhile is seen in its newer state, so neither counts as lost."""
    present = broker_task_ids(client)
    expected = awaited_messages()
    return len(expected), {m for m in expected if m.task_id not in present}


def ping_answers(app: Any, me: str) -> Counter[str]:
    """How many live workers answered a ping under each name, ``me`` included (whose own loop may be busy
    sending it). A broker that is away raises instead, so an empty answer means that no other worker is there.
    A name answering twice is two live processes under one name (a mistake Celery warns about)."""
    replies = app.control.ping(timeout=PING_TIMEOUT) or []
    answers = Counter(name for reply in replies for name in reply)
    answers[me] = max(answers[me], 1)
    return answers


class DeadWorkerSweep:
    """Holds the suspects of the last sweep: a worker is dead, or a message lost, only after two sweeps in a
    row miss it."""

    def __init__(self, app: Any, me: str) -> None:
        self.app = app
        self.me = me
        self.suspects: set[str] = set()
        self.lost_suspects: set[Awaited] = set()

    def __call__(self) -> list[str]:
        try:
            return self.sweep()
        except Exception:  # the broker or database is away for a moment: the next sweep tries again
            log_failure(logger, "dead-worker sweep failed")
            return []
        finally:
            get_engine().dispose()  # the main process forks pool processes: keep no connection open

    def sweep(self) -> list[str]:
        answers = ping_answers(self.app, self.me)
        running = records.running_subtasks()  # before Redis: a start seen on a subtask is already announced there
        with self.app.connection_for_write() as connection:
            latest = incarnation.refresh(connection.default_channel.client, self.me)
        missing = {part.worker for part in running if part.worker not in answers}
        dead, self.suspects = missing & self.suspects, missing
        requeued = []
        for part in running:
            if answers[part.worker] < 2 and incarnation.replaced(part.worker, part.incarnation, latest):
                why = "was started again (its earlier process, which ran it, is gone)"
            elif part.worker in dead:
                why = "stopped answering while running it"
            else:
                continue
            new = requeue(part.job_id, part.attempt)
            if new is None:
                continue  # another sweeper got there first, the job ended, or another of its parts re-queued it
            logger.warning("job %s: worker %s %s; re-queued as attempt %d", part.job_id, part.worker, why, new)
            requeued.append(part.job_id)
        requeued += self.sweep_lost()
        if requeued:
            scheduler.admit()  # the new attempts wait in SQL like any queued volume; send what there is room for
        return requeued

    def sweep_lost(self) -> list[str]:
        """Start a new attempt of each admitted or running job whose awaited message was missing twice in a row."""
        with self.app.connection_for_write() as connection:
            expected, missing = lost_messages(connection.default_channel.client)
        lost, self.lost_suspects = missing & self.lost_suspects, missing
        flushed = bool(lost) and expected > 1 and len(missing) == expected
        if flushed:
            logger.warning("Redis holds none of the %d messages that admitted and running jobs wait on: it was "
                           "restarted empty (no persistence), flushed, or failed over to a copy without them; "
                           "re-sending them as new attempts", expected)
        requeued: list[str] = []
        for message in sorted(lost):
            new = (requeue if message.started else records.readmit_if)(message.job_id, message.attempt)
            if new is None:
                continue  # another sweeper got there first, the job moved on, or it has another lost message
            if flushed:
                logger.info("job %s: re-queued as attempt %d (%s was lost with the broker's data)", message.job_id,
                            new, message.task_id)
            else:
                logger.warning("job %s: the message of %s is in no queue and not delivered (lost by a worker killed "
                               "while fetching it, or by the broker); re-queued as attempt %d", message.job_id,
                               message.task_id, new)
            requeued.append(message.job_id)
        return requeued


def requeue(job_id: str, attempt: int) -> int | None:
    """Start a new attempt of a running job (``records.requeue_if``), then drop the old attempt's delivered
    messages from ``unacked``: their process is dead or their work superseded, and left there they would come
    back at the visibility timeout only to be discarded as stale. Returns the new attempt, or None."""
    new = records.requeue_if(job_id, attempt)
    if new is not None:
        try:
            with get_app().connection_for_write() as connection:
                drop_delivered(connection.default_channel.client, attempt_task_prefix(job_id, attempt))
        except Exception:  # the broker away: the visibility timeout brings them back, and they are discarded then
            logger.warning("job %s: could not drop attempt %d's delivered messages; the visibility timeout brings "
                           "them back and they are discarded as stale", job_id, attempt)
    return new


def drop_delivered(client: Any, prefix: str) -> int:
    """Delete from kombu's ``unacked`` hash (and its index) the messages whose task id starts with ``prefix``. A
    worker that still runs one acknowledges it later by deleting its entry, which is then simply gone."""
    tags = [tag for tag, raw in client.hgetall(UNACKED_KEY).items() if (_message_id(raw) or "").startswith(prefix)]
    if tags:
        client.pipeline().hdel(UNACKED_KEY, *tags).zrem(UNACKED_INDEX_KEY, *tags).execute()
    return len(tags)


def take_back(worker: str, why: str, keep: str | None = None) -> list[str]:
    """Start a new attempt of each job with a subtask that ``worker`` runs under another start than ``keep``
    (None: any start), and admit them: what a dead process of that name left running. Returns the job ids."""
    requeued = []
    for part in records.running_subtasks(worker):
        if keep is not None and part.incarnation == keep:
            continue
        new = requeue(part.job_id, part.attempt)
        if new is not None:
            logger.warning("job %s: worker %s %s; re-queued as attempt %d", part.job_id, worker, why, new)
            requeued.append(part.job_id)
    if requeued:
        scheduler.admit()
    return requeued


def hand_back_quietly(worker: str, exit_code: int) -> None:
    """The launcher saw ``worker``'s process die: take back what it ran at once (logs instead of raising; the
    sweeps and the restarted worker take it back otherwise)."""
    try:
        take_back(worker, f"died while running it (exit code {exit_code})")
    except Exception:
        logger.exception("could not take back the work of %s; the restarted worker or a sweep does", worker)
    finally:
        get_engine().dispose()
