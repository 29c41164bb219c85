"""Where the time went: every step's run as recorded in ``steps``, and each device's busy fraction.

A device is busy while a step holds its lease (``busy_started_at`` .. ``busy_finished_at``); it is idle
between those intervals. `segq report`, `segq watch` and the GPU benchmark all read these figures, so
what a user sees and what a benchmark claims come from one record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from segq.db import session_scope
from segq.models import Job, Step

Interval = tuple[datetime, datetime]


@dataclass(frozen=True)
class DeviceUse:
    """One device worker's use of its device over a span of time."""

    worker: str
    device: str
    parts: int
    busy_seconds: float
    span_seconds: float
    intervals: tuple[Interval, ...]

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / self.span_seconds if self.span_seconds > 0 else 0.0


def _union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _clip(intervals: Sequence[Interval], lo: datetime, hi: datetime) -> list[Interval]:
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def busy_interval(step: Step) -> Interval:
    """When the step held its device (the whole step when it recorded no lease)."""
    if step.busy_started_at is not None and step.busy_finished_at is not None:
        return step.busy_started_at, step.busy_finished_at
    return step.started_at, step.finished_at


def device_use(steps: Iterable[Step], start: datetime | None = None, end: datetime | None = None) -> list[DeviceUse]:
    """Each device worker's busy time over ``[start, end]`` (default: from its first part to its last)."""
    by_worker: dict[str, list[Step]] = {}
    for step in steps:
        if step.step == "infer":
            by_worker.setdefault(step.worker, []).append(step)
    uses = []
    for worker, parts in sorted(by_worker.items()):
        intervals = _union(busy_interval(p) for p in parts)
        lo = start or intervals[0][0]
        hi = end or intervals[-1][1]
        clipped = _clip(intervals, lo, hi)
        uses.append(DeviceUse(worker, parts[0].device or "", len(parts),
                              sum((b - a).total_seconds() for a, b in clipped), max((hi - lo).total_seconds(), 0.0),
                              tuple(clipped)))
    return uses


def steady_window(steps: Iterable[Step]) -> Interval | None:
    """From the moment every device worker has started its first part to the moment the first of them ends its
    last: the span in which a scheduler can keep them all busy (None without two such moments)."""
    firsts: dict[str, datetime] = {}
    lasts: dict[str, datetime] = {}
    for step in steps:
        if step.step != "infer":
            continue
        a, b = busy_interval(step)
        firsts[step.worker] = min(firsts.get(step.worker, a), a)
        lasts[step.worker] = max(lasts.get(step.worker, b), b)
    if not firsts:
        return None
    lo, hi = max(firsts.values()), min(lasts.values())
    return (lo, hi) if hi > lo else None


def load_steps(dataset_ids: Sequence[str] | None = None, url: str | None = None) -> list[Step]:
    """The recorded steps, oldest first; only those of ``dataset_ids`` when given (``url``: another database)."""
    with session_scope(url) as s:
        query = select(Step).order_by(Step.started_at)
        if dataset_ids is not None:
            query = query.join(Job).where(Job.dataset_id.in_(list(dataset_ids)))
        return list(s.scalars(query))
