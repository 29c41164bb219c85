"""Live progress of datasets from the database: volumes, subtasks, windows per second, workers, ETA.

Everything here reads SQL only, so ``segq watch`` works from any machine that reaches the database.
``summarize`` is pure (samples in, figures out) and is what the unit tests check; ``load`` fetches
the samples; ``render`` draws them with rich.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from sqlalchemy import and_, func, select

from segq import clock
from segq.db import session_scope
from segq.models import Job, Status, Subtask
from segq.storage import printable

logger = logging.getLogger("segq.watch")

HORIZON_SECONDS = 60.0  # rates are measured over the subtasks finished this recently


@dataclass(frozen=True)
class JobSample:
    id: str
    status: Status
    windows: int | None = None
    subtasks: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    merge_seconds: float | None = None


@dataclass(frozen=True)
class PartSample:
    """A subtask of a running job's current attempt."""

    job_id: str
    status: Status
    windows: int


@dataclass(frozen=True)
class WorkerTotal:
    """A worker's done subtasks of the watched datasets (current attempts)."""

    worker: str
    subtasks: int
    windows: int
    busy_seconds: float


@dataclass(frozen=True)
class RecentPart:
    worker: str
    windows: int
    finished_at: datetime | None


@dataclass(frozen=True)
class WorkerRate:
    worker: str
    subtasks: int
    windows: int
    busy_windows_per_second: float | None  # windows per second of the worker's own busy time
    recent_windows_per_second: float  # its share of the recent throughput
    busy_fraction: float | None = None  # share of the recent horizon its device was held (segq.timeline)


@dataclass(frozen=True)
class Snapshot:
    total: int
    counts: dict[str, int]
    subtasks_done: int
    subtasks_total: int
    windows_done: int
    windows_remaining: float | None
    windows_per_second: float
    volumes_per_hour: float
    eta_seconds: float | None
    workers: list[WorkerRate] = field(default_factory=list)
    # workers building an engine now (a first torch.compile takes minutes): name -> (what, seconds so far)
    loading: dict[str, tuple[str, float]] = field(default_factory=dict)

    def count(self, status: Status) -> int:
        return self.counts.get(status.value, 0)

    @property
    def finished(self) -> int:
        return sum(self.count(s) for s in (Status.DONE, Status.FAILED, Status.CANCELLED))

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.finished == self.total


def _span(jobs: Sequence[JobSample], now: datetime, horizon: float) -> float:
    """Seconds the recent rates are averaged over: the horizon, or less when the work began more recently."""
    starts = [s for j in jobs if (s := j.started_at) is not None]
    if not starts:
        return horizon
    return min(horizon, max(1.0, (now - min(starts)).total_seconds()))


def _remaining_windows(jobs: Sequence[JobSample], parts: Sequence[PartSample]) -> float | None:
    """Windows still to run: what running jobs have left, plus queued jobs at the mean planned size."""
    planned = [j.windows for j in jobs if j.windows]
    mean = statistics.fmean(planned) if planned else None
    done_by_job: dict[str, int] = {}
    for part in parts:
        if part.status == Status.DONE:
            done_by_job[part.job_id] = done_by_job.get(part.job_id, 0) + part.windows
    remaining = 0.0
    for job in jobs:
        if job.status.final:
            continue
        if job.windows:
            remaining += max(0, job.windows - done_by_job.get(job.id, 0))
        elif mean is None:
            return None
        else:
            remaining += mean
    return remaining


def _merges_left_seconds(jobs: Sequence[JobSample]) -> float:
    """Each unfinished volume still needs its merge (after its last slab): the mean merge of the done ones each.

    Without it the ETA read 0 s once the last window ran, while the merges of large volumes took minutes.
    """
    merges = [j.merge_seconds for j in jobs if j.status == Status.DONE and j.merge_seconds is not None]
    unfinished = sum(1 for j in jobs if not j.status.final)
    return unfinished * statistics.fmean(merges) if merges else 0.0


def summarize(jobs: Sequence[JobSample], parts: Sequence[PartSample], workers: Sequence[WorkerTotal],
              recent: Sequence[RecentPart], now: datetime, horizon: float = HORIZON_SECONDS,
              busy: Mapping[str, float] | None = None) -> Snapshot:
    """The figures of one progress line from samples of the database; ``busy``: each device worker's busy
    fraction over the horizon."""
    busy = busy or {}
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status.value] = counts.get(job.status.value, 0) + 1
    done_jobs = [j for j in jobs if j.status == Status.DONE]
    running_ids = {j.id for j in jobs if not j.status.final}
    live_done = [p for p in parts if p.status == Status.DONE and p.job_id in running_ids]
    span = _span(jobs, now, horizon)
    cutoff = now - timedelta(seconds=horizon)
    fresh = [r for r in recent if (t := r.finished_at) is not None and t >= cutoff]
    rate = sum(r.windows for r in fresh) / span
    recent_volumes = sum(1 for j in done_jobs if (t := j.finished_at) is not None and t >= cutoff)
    volumes_per_hour = recent_volumes / span * 3600
    remaining = _remaining_windows(jobs, parts)
    unfinished = len(running_ids)
    if unfinished == 0:
        eta: float | None = 0.0
    elif remaining is not None and rate > 0:
        eta = remaining / rate + _merges_left_seconds(jobs)
    elif volumes_per_hour > 0:
        eta = unfinished / volumes_per_hour * 3600
    else:
        eta = None
    by_worker: dict[str, int] = {}
    for r in fresh:
        by_worker[r.worker] = by_worker.get(r.worker, 0) + r.windows
    rates = [WorkerRate(w.worker, w.subtasks, w.windows,
                        w.windows / w.busy_seconds if w.busy_seconds > 0 else None, by_worker.get(w.worker, 0) / span,
                        busy.get(w.worker))
             for w in sorted(workers, key=lambda w: w.worker)]
    return Snapshot(
        total=len(jobs), counts=counts,
        subtasks_done=sum(j.subtasks or 0 for j in done_jobs) + len(live_done),
        subtasks_total=sum(j.subtasks or 0 for j in jobs),
        windows_done=sum(j.windows or 0 for j in done_jobs) + sum(p.windows for p in live_done),
        windows_remaining=remaining, windows_per_second=rate, volumes_per_hour=volumes_per_hour, eta_seconds=eta,
        workers=rates,
    )


def load(dataset_ids: Sequence[str], now: datetime | None = None,
         horizon: float = HORIZON_SECONDS) -> tuple[list[JobSample], list[PartSample], list[WorkerTotal],
                                                    list[RecentPart]]:
    """The samples ``summarize`` needs, in four queries over the watched datasets' current attempts."""
    now = now or clock.now()
    current = and_(Subtask.job_id == Job.id, Subtask.attempt == Job.attempt)
    in_sets = Job.dataset_id.in_(list(dataset_ids))
    with session_scope() as s:
        jobs = [JobSample(*row) for row in s.execute(
            select(Job.id, Job.status, Job.windows, Job.subtasks, Job.started_at, Job.finished_at, Job.merge_seconds)
            .where(in_sets))]
        parts = [PartSample(*row) for row in s.execute(
            select(Subtask.job_id, Subtask.status, Subtask.windows).join(Job, current)
            .where(in_sets, Job.status == Status.RUNNING))]
        workers = [WorkerTotal(str(row[0]), int(row[1]), int(row[2] or 0), float(row[3] or 0.0)) for row in s.execute(
            select(Subtask.worker, func.count(), func.sum(Subtask.windows), func.sum(Subtask.seconds))
            .join(Job, current).where(in_sets, Subtask.status == Status.DONE, Subtask.worker.is_not(None))
            .group_by(Subtask.worker))]
        recent = [RecentPart(str(row[0]), int(row[1]), row[2]) for row in s.execute(
            select(Subtask.worker, Subtask.windows, Subtask.finished_at).join(Job, current)
            .where(in_sets, Subtask.status == Status.DONE, Subtask.worker.is_not(None),
                   Subtask.finished_at >= now - timedelta(seconds=horizon)))]
    return jobs, parts, workers, recent


def recent_busy(now: datetime, horizon: float) -> dict[str, float]:
    """Each device worker's busy fraction over the last ``horizon`` seconds, from the timeline of every dataset
    (a GPU busy with another dataset is busy): parts that ended in the horizon, clipped to it."""
    from segq.models import Step
    from segq.timeline import device_use

    start = now - timedelta(seconds=horizon)
    with session_scope() as s:
        steps = list(s.scalars(select(Step).where(Step.step == "infer", Step.finished_at >= start)))
    return {u.worker: u.busy_fraction for u in device_use(steps, start, now)}


def engines_loading(now: float) -> dict[str, tuple[str, float]]:
    """Workers building an engine, from Redis; empty when Redis does not answer (the rest of watch still shows)."""
    import redis

    from segq.scheduler import engines_loading as announced

    try:
        return {w: (str(v.get("what", "")), max(0.0, now - float(v.get("since", now)))) for w, v in announced().items()}
    except (redis.RedisError, ValueError):
        return {}


def gpu_workers_now() -> set[str] | None:
    """The GPU workers admission counts now, from Redis; None when Redis does not answer."""
    import redis

    from segq.scheduler import gpu_worker_names

    try:
        return gpu_worker_names()
    except redis.RedisError:
        return None


def roster_lines(before: set[str] | None, now: set[str] | None) -> list[str]:
    """A line for each GPU worker that joined or left between two looks (the first look lists who is there)."""
    if now is None:
        return []
    count = f"{len(now)} GPU worker(s) now"
    if before is None:
        return [printable(f"GPU workers: {', '.join(sorted(now)) or 'none yet'}")]
    joined = [printable(f"{w} joined: engine ready, taking GPU work ({count})") for w in sorted(now - before)]
    left = [printable(f"{w} left ({count})") for w in sorted(before - now)]
    return joined + left


def snapshot(dataset_ids: Sequence[str], horizon: float = HORIZON_SECONDS) -> Snapshot:
    now = clock.now()
    snap = summarize(*load(dataset_ids, now, horizon), now=now, horizon=horizon, busy=recent_busy(now, horizon))
    return dataclasses.replace(snap, loading=engines_loading(now.timestamp()))


def loading_line(worker: str, what: str, seconds: float) -> str:
    """What a worker building its engine is doing: a first torch.compile keeps a GPU idle for minutes."""
    return printable(f"{worker}: building the {what} engine for {format_seconds(seconds)} (a first torch.compile "
                     "takes minutes; later starts read inductor's cache)")


def loading_lines(snap: Snapshot) -> list[str]:
    return [loading_line(worker, what, seconds) for worker, (what, seconds) in sorted(snap.loading.items())]


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def headline(snap: Snapshot) -> str:
    """One plain line: what a log or a non-terminal gets."""
    parts = [f"{snap.count(Status.DONE)}/{snap.total} volumes done"]
    parts += [f"{snap.count(s)} {s.value}" for s in (Status.FAILED, Status.CANCELLED, Status.RUNNING, Status.QUEUED)
              if snap.count(s)]
    parts.append(f"subtasks {snap.subtasks_done}/{snap.subtasks_total}")
    parts.append(f"{snap.windows_per_second:.1f} windows/s")
    parts.append(f"ETA {format_seconds(snap.eta_seconds)}")
    return ", ".join(parts)


def render(snap: Snapshot, title: str) -> RenderableType:
    """The live display: a headline, a bar over volumes, and a table of workers."""
    colour = {"done": "green", "failed": "red", "cancelled": "magenta", "running": "yellow", "queued": "blue"}
    head = Text.assemble((printable(title), "bold"), "  ")  # Text: a dataset name is never markup
    for status in ("done", "failed", "cancelled", "running", "queued"):
        if snap.counts.get(status):
            head.append(f"{snap.counts[status]} {status}  ", style=colour[status])
    bar = Table.grid(padding=(0, 2))
    bar.add_row(ProgressBar(total=max(snap.total, 1), completed=snap.finished, width=40),
                f"{snap.finished}/{snap.total} volumes",
                f"subtasks {snap.subtasks_done}/{snap.subtasks_total}",
                f"{snap.windows_per_second:.1f} windows/s", f"{snap.volumes_per_hour:.0f} volumes/h",
                f"ETA {format_seconds(snap.eta_seconds)}")
    loading = [Text(line, style="yellow") for line in loading_lines(snap)]
    if not snap.workers:
        return Group(head, bar, *loading)
    table = Table("worker", "subtasks", "windows", "windows/s busy", "windows/s now", "busy %", box=None,
                  header_style="bold")
    for w in snap.workers:
        table.add_row(Text(printable(w.worker)), str(w.subtasks), str(w.windows),
                      "" if w.busy_windows_per_second is None else f"{w.busy_windows_per_second:.1f}",
                      f"{w.recent_windows_per_second:.1f}",
                      "" if w.busy_fraction is None else f"{w.busy_fraction:.0%}")
    return Group(head, bar, table, *loading)
