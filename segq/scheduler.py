"""Which volume prepares next, and into how many GPU parts a prepared volume is cut.

Two rules keep every GPU busy without letting the dataset pile up in storage (docs/DESIGN.md):

**Bounded look-ahead.** A job waits in SQL (``queued``, ``admitted_at`` empty) until there is room:
at most ``gpu_workers x (SEGQ_LOOKAHEAD + 1)`` volumes are admitted and unfinished at once
(preparing, prepared, on a GPU or merging). Only then is its prepare task sent. So storage holds
that many workspaces whatever the dataset's size, the first mask appears within seconds, and a
cancel throws away at most that much work. Room is handed out fairly: higher priority first, then
the dataset with the fewest volumes in flight, then the oldest dataset; so a later dataset is never
starved by an earlier one's thousands of queued volumes. :func:`admit` runs whenever room may have
opened (submit, resume, a job that ended) and every ``SEGQ_ADMIT_INTERVAL`` seconds on each worker
as a safety net (a message lost between the SQL commit and the broker).

**Split only when it pays.** A whole volume on one GPU costs one partial sum and one read at merge;
cutting it lets several GPUs share it. :func:`split_parts` cuts a volume into
``ceil(gpus / (backlog + 1))`` parts, where backlog is the volumes still waiting for a GPU: while at
least as many volumes wait as there are GPUs, every volume runs whole; a large volume alone (a CT)
or a dataset's last volumes are spread over the GPUs that would otherwise idle.

GPU workers announce themselves with a heartbeat in Redis (``segq.names.GPU_WORKERS_KEY``), so the
window follows the GPUs present as machines come and go.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from segq import clock, records
from segq.celery_app import get_app
from segq.db import log_failure, session_scope
from segq.models import Dataset, Job, Status, Step, Subtask, utcnow
from segq.names import (
    ENGINE_LOADING_KEY,
    GPU_WORKERS_KEY,
    PREPARE,
    PREPARE_QUEUE,
    PRIORITIES,
    queue_for,
    volume_task_id,
)
from segq.settings import Settings, get_settings

logger = logging.getLogger("segq.scheduler")

# A GPU worker that has not beaten for this many admit intervals is counted as gone.
HEARTBEAT_MISSES = 6
# The recent steps the admission's pace is read from, and the most volumes it lets ahead of each GPU.
DEFAULT_LOOKAHEAD = 3
PACE_STEPS = 64
# The fewest windows a lone volume's extra streamed part holds (about 0.4 s of an H200 with SwinUNETR fs48): below
# that, a part's own costs (its partial written and added) outweigh what streaming overlaps.
LONE_PART_WINDOWS = 64
MAX_PACED_LOOKAHEAD = 12
UNFINISHED = (Status.QUEUED, Status.RUNNING)
# An admitted volume not finished yet: it holds (or is about to hold) a workspace and a share of the window.
IN_FLIGHT = Job.status.in_(UNFINISHED) & Job.admitted_at.is_not(None)


def split_parts(windows: int, gpus: int, backlog: int, min_windows: int, max_windows: int,
                lone_parts: int = 1) -> int:
    """How many GPU parts a volume of ``windows`` windows is cut into.

    ``gpus``: GPU workers present; ``backlog``: other volumes still waiting for a GPU; ``min_windows``:
    the fewest windows worth a part of their own (two ROI batches); ``max_windows``: the most one part
    may hold (SEGQ_MAX_WINDOWS_PER_SUBTASK, or the dataset's --max-windows-per-subtask).

    ``lone_parts`` (SEGQ_LONE_PARTS): a volume nothing else waits behind, someone waits for; cut into at least
    that many parts where each keeps LONE_PART_WINDOWS windows, so that even on one GPU its first part runs while
    prepare streams the rest of the input, and the first partials are added while the last part runs.
    """
    if windows < 1:
        raise ValueError(f"a volume has at least one window, got {windows}")
    share = math.ceil(max(gpus, 1) / (max(backlog, 0) + 1))  # GPUs this volume would otherwise leave idle
    if backlog <= 0:
        share = max(share, min(lone_parts, windows // LONE_PART_WINDOWS))
    worth = max(1, windows // max(min_windows, 1))
    return min(max(min(share, worth), math.ceil(windows / max_windows)), windows)


@dataclass
class Waiting:
    """A dataset with volumes waiting for room, as the admission sees it."""

    dataset_id: str
    priority: str
    created_at: datetime
    in_flight: int
    job_ids: list[str]

    def rank(self) -> tuple[int, int, datetime]:
        return PRIORITIES.index(self.priority), self.in_flight, self.created_at


def pick(waiting: Sequence[Waiting], room: int) -> list[tuple[str, str]]:
    """The next ``room`` (job id, priority) pairs: higher priority first, then the dataset with the fewest
    volumes in flight (round robin between equals), then the oldest dataset; each dataset in job order."""
    heap = [(w.rank(), i) for i, w in enumerate(waiting) if w.job_ids]
    heapq.heapify(heap)
    cursor = [0] * len(waiting)
    picked: list[tuple[str, str]] = []
    while heap and len(picked) < room:
        _, i = heapq.heappop(heap)
        group = waiting[i]
        picked.append((group.job_ids[cursor[i]], group.priority))
        cursor[i] += 1
        group.in_flight += 1
        if cursor[i] < len(group.job_ids):
            heapq.heappush(heap, (group.rank(), i))
    return picked


def _redis(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=5)


def heartbeat(worker: str, settings: Settings | None = None) -> None:
    """Say that GPU worker ``worker`` is alive (its score is the time); a simulated worker counts as several."""
    settings = settings or get_settings()
    devices = settings.simulate_devices if settings.backend == "simulate" else 1
    members = [worker] if devices == 1 else [f"{worker}/{k}" for k in range(devices)]
    client = _redis(settings)
    try:  # scored by Redis's own clock: the sweep in gpu_workers compares scores written on every machine
        client.zadd(GPU_WORKERS_KEY, dict.fromkeys(members, clock.redis_time(client)))
    finally:
        client.close()


@contextlib.contextmanager
def loading(worker: str | None, what: str, settings: Settings) -> Iterator[None]:
    """List ``worker`` as building an engine while the block runs (a first torch.compile takes minutes).

    Best effort: Redis away only costs the display, never the engine."""
    import redis

    if worker is None:
        yield
        return
    client = _redis(settings)
    try:
        client.hset(ENGINE_LOADING_KEY, worker, json.dumps({"what": what, "since": clock.timestamp()}))
    except redis.RedisError:
        logger.warning("could not announce the engine build in Redis; segq watch will not show it")
    try:
        yield
    finally:
        with contextlib.suppress(redis.RedisError):
            client.hdel(ENGINE_LOADING_KEY, worker)
        client.close()


def engines_loading(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """Workers building an engine now: name -> {what, since} (``segq watch``)."""
    client = _redis(settings or get_settings())
    try:
        return {k.decode() if isinstance(k, bytes) else str(k): json.loads(v)
                for k, v in client.hgetall(ENGINE_LOADING_KEY).items()}
    finally:
        client.close()


def forget_worker(worker: str, settings: Settings | None = None) -> None:
    """Take ``worker`` out of the count at once (warm shutdown), instead of waiting for it to go stale."""
    settings = settings or get_settings()
    client = _redis(settings)
    try:
        client.zrem(GPU_WORKERS_KEY, worker, *(f"{worker}/{k}" for k in range(settings.simulate_devices)))
    finally:
        client.close()


def live_after(settings: Settings, client: Any) -> float:
    """The heartbeat time (unix, on the broker's clock) before which a GPU worker counts as gone."""
    return clock.redis_time(client) - HEARTBEAT_MISSES * settings.admit_interval


def gpu_worker_names(settings: Settings | None = None) -> set[str]:
    """The GPU workers counted now, by name (``segq watch`` says when one joins or leaves)."""
    settings = settings or get_settings()
    client = _redis(settings)
    try:
        names = client.zrangebyscore(GPU_WORKERS_KEY, f"({live_after(settings, client)}", "+inf")
    finally:
        client.close()
    return {n.decode() if isinstance(n, bytes) else str(n) for n in names}


def gpu_workers(settings: Settings | None = None) -> int:
    """GPU workers that beat recently (at least 1: a dataset submitted before any worker starts still
    gets one worker's room)."""
    settings = settings or get_settings()
    client = _redis(settings)
    try:
        client.zremrangebyscore(GPU_WORKERS_KEY, "-inf", live_after(settings, client))
        return max(1, int(client.zcard(GPU_WORKERS_KEY)))
    finally:
        client.close()


def window(gpus: int, settings: Settings | None = None) -> int:
    """Volumes that may be admitted and unfinished at once."""
    settings = settings or get_settings()
    return max(1, gpus) * (paced_lookahead(settings) + 1)


def paced_lookahead(settings: Settings) -> int:
    """SEGQ_LOOKAHEAD where it is set; else 3, or more when preparing a volume takes longer than a GPU takes to run
    one.

    A bundle's CT takes 1.4 s to prepare and 0.35 s on an H200: with three volumes ahead the GPU waited a third
    of the time (bench/results/bundle_dataset_h200.jsonl). The recent timeline says how many must be prepared
    at once to keep a GPU fed: prepare's median over a part's median time on the device, plus one merging.
    """
    if settings.lookahead is not None:
        return settings.lookahead
    with session_scope() as s:
        rows = s.execute(select(Step.step, Step.started_at, Step.finished_at, Step.busy_started_at,
                                Step.busy_finished_at).order_by(Step.finished_at.desc()).limit(PACE_STEPS)).all()
    prepare = [(r.finished_at - r.started_at).total_seconds() for r in rows if r.step == "prepare"]
    device = [(r.busy_finished_at - r.busy_started_at).total_seconds() for r in rows
              if r.step == "infer" and r.busy_started_at is not None and r.busy_finished_at is not None]
    if not prepare or not device:
        return DEFAULT_LOOKAHEAD
    need = math.ceil(statistics.median(prepare) / max(statistics.median(device), 1e-3)) + 1
    return max(DEFAULT_LOOKAHEAD, min(need, MAX_PACED_LOOKAHEAD))


def in_flight() -> int:
    """Admitted volumes not finished yet: each holds (or is about to hold) a workspace."""
    with session_scope() as s:
        return _count_in_flight(s)


def _count_in_flight(s: Any) -> int:
    return int(s.scalar(select(func.count()).select_from(Job).where(IN_FLIGHT)) or 0)


def backlog(exclude: str | None = None) -> int:
    """Volumes still waiting for a GPU (``exclude``: the asking job): queued in SQL, being prepared, or
    prepared with none of their parts started yet."""
    started = (select(Subtask.id).where(Subtask.job_id == Job.id, Subtask.attempt == Job.attempt,
                                        Subtask.status != Status.QUEUED).exists())
    with session_scope() as s:
        query = select(func.count()).select_from(Job).where(
            (Job.status == Status.QUEUED) | ((Job.status == Status.RUNNING) & ~started))
        if exclude:
            query = query.where(Job.id != exclude)
        return int(s.scalar(query) or 0)


def _waiting(s: Any, room: int) -> list[Waiting]:
    """Datasets with volumes waiting, each with its first ``room`` job ids and its volumes in flight."""
    counts = s.execute(select(Job.dataset_id, func.count()).where(IN_FLIGHT).group_by(Job.dataset_id))
    flying = {dataset_id: int(n) for dataset_id, n in counts}
    groups = []
    query = (select(Dataset.id, Dataset.priority, Dataset.created_at).where(Dataset.id.in_(
        select(Job.dataset_id).where(Job.status == Status.QUEUED, Job.admitted_at.is_(None)).distinct())))
    for dataset_id, priority, created_at in s.execute(query):
        ids = list(s.scalars(select(Job.id).where(Job.dataset_id == dataset_id, Job.status == Status.QUEUED,
                                                 Job.admitted_at.is_(None))
                             .order_by(Job.queued_at, Job.input_path).limit(room)))
        groups.append(Waiting(dataset_id, priority if priority in PRIORITIES else "normal", created_at,
                              flying.get(dataset_id, 0), ids))
    return groups


def _claim(settings: Settings, gpus: int) -> list[tuple[str, int, str]]:
    """Mark the next jobs admitted, within the window; returns (job id, attempt, priority) of each."""
    with session_scope() as s:
        records.lock(s, records.ADMIT_LOCK_KEY)  # two admitters at once must not both fill the same room
        room = window(gpus, settings) - _count_in_flight(s)
        if room <= 0:
            return []
        picked = pick(_waiting(s, room), room)
        if not picked:
            return []
        ids = [job_id for job_id, _ in picked]
        s.execute(update(Job).where(Job.id.in_(ids)).values(admitted_at=utcnow()))
        rows = s.execute(select(Job.id, Job.attempt).where(Job.id.in_(ids)))
        attempts = {job_id: attempt for job_id, attempt in rows}
        return [(job_id, attempts[job_id], priority) for job_id, priority in picked]


def _unclaim(job_ids: list[str]) -> None:
    with session_scope() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids), Job.status == Status.QUEUED).values(admitted_at=None))


def admit(settings: Settings | None = None) -> list[str]:
    """Send the prepare task of as many waiting volumes as there is room for; returns their job ids.

    The room is claimed in SQL first, then the messages are sent; a broker that refuses gives the
    unsent volumes their room back (and the error is raised), so they wait in SQL, not in limbo.
    """
    settings = settings or get_settings()
    claimed = _claim(settings, gpu_workers(settings))
    sent: list[str] = []
    try:
        for job_id, attempt, priority in claimed:
            get_app().send_task(PREPARE, args=(job_id, attempt), queue=queue_for(PREPARE_QUEUE, priority),
                                task_id=volume_task_id(job_id, attempt))
            sent.append(job_id)
    except Exception:
        _unclaim([job_id for job_id, _, _ in claimed if job_id not in sent])
        raise
    if sent:
        logger.info("admitted %d volume(s) to prepare", len(sent))
    return sent


def admit_quietly() -> list[str]:
    """:func:`admit` from a worker's step or timer: logs instead of raising (the next call tries again)."""
    try:
        return admit()
    except Exception:
        log_failure(logger, "admitting waiting volumes failed; the next heartbeat tries again")
        return []


def release_stale_admissions(settings: Settings | None = None, older_than: float | None = None) -> int:
    """Give back the room of volumes admitted long ago that never started (their message was lost between
    the SQL commit and the broker); the next :func:`admit` sends them again. Returns how many."""
    settings = settings or get_settings()
    age = older_than if older_than is not None else settings.visibility_timeout
    cutoff = utcnow() - timedelta(seconds=age)
    with session_scope() as s:
        result = s.execute(update(Job).where(Job.status == Status.QUEUED, Job.admitted_at.is_not(None),
                                             Job.admitted_at < cutoff).values(admitted_at=None))
        return int(getattr(result, "rowcount", 0) or 0)
