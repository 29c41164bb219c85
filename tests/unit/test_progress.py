"""Progress figures from database samples: counts, subtasks, windows per second, per-worker rates, ETA."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from producer.watch import (
    JobSample,
    PartSample,
    RecentPart,
    WorkerTotal,
    headline,
    render,
    summarize,
)
from segq.models import Status

NOW = datetime(2026, 1, 1, 3, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def test_counts_subtasks_rate_and_eta() -> None:
    jobs = [
        JobSample("a", Status.DONE, windows=8, subtasks=2, started_at=ago(600), finished_at=ago(30)),
        JobSample("b", Status.RUNNING, windows=8, subtasks=2, started_at=ago(20)),
        JobSample("c", Status.QUEUED),
        JobSample("d", Status.FAILED, windows=8, subtasks=2, started_at=ago(500), finished_at=ago(400)),
    ]
    parts = [PartSample("b", Status.DONE, 4), PartSample("b", Status.RUNNING, 4)]
    workers = [WorkerTotal("w2@h", 1, 4, 2.0), WorkerTotal("w1@h", 2, 8, 1.0)]
    recent = [RecentPart("w1@h", 8, ago(30)), RecentPart("w2@h", 4, ago(5)), RecentPart("w1@h", 100, ago(61))]
    snap = summarize(jobs, parts, workers, recent, NOW, horizon=60)
    assert snap.total == 4 and snap.count(Status.DONE) == 1 and snap.count(Status.FAILED) == 1
    assert snap.finished == 2 and not snap.complete
    assert snap.subtasks_done == 2 + 1 and snap.subtasks_total == 6
    assert snap.windows_done == 8 + 4
    assert snap.windows_per_second == pytest.approx(12 / 60)  # the part finished 61 s ago is outside the horizon
    assert snap.windows_remaining == pytest.approx(4 + 8)  # b has 4 left, c is unplanned: the mean plan (8)
    assert snap.eta_seconds == pytest.approx(12 / (12 / 60))
    assert snap.volumes_per_hour == pytest.approx(1 / 60 * 3600)
    assert [w.worker for w in snap.workers] == ["w1@h", "w2@h"]
    w1, w2 = snap.workers
    assert w1.busy_windows_per_second == pytest.approx(8.0) and w2.busy_windows_per_second == pytest.approx(2.0)
    assert w1.recent_windows_per_second == pytest.approx(8 / 60)
    assert w2.recent_windows_per_second == pytest.approx(4 / 60)


def test_rate_span_is_shorter_when_the_work_began_recently() -> None:
    jobs = [JobSample("a", Status.RUNNING, windows=20, subtasks=5, started_at=ago(10))]
    snap = summarize(jobs, [PartSample("a", Status.DONE, 4)], [], [RecentPart("w", 4, ago(2))], NOW, horizon=60)
    assert snap.windows_per_second == pytest.approx(0.4)
    assert snap.eta_seconds == pytest.approx(16 / 0.4)


def test_eta_unknown_before_anything_ran_and_zero_when_all_ended() -> None:
    queued = summarize([JobSample("a", Status.QUEUED), JobSample("b", Status.QUEUED)], [], [], [], NOW)
    assert queued.eta_seconds is None and queued.windows_remaining is None and queued.windows_per_second == 0
    assert "ETA unknown" in headline(queued)
    ended = summarize([JobSample("a", Status.DONE, 1, 1, ago(5), ago(1)), JobSample("b", Status.CANCELLED)],
                      [], [], [], NOW)
    assert ended.complete and ended.eta_seconds == 0


def test_eta_falls_back_to_volumes_per_hour_without_window_counts() -> None:
    jobs = [JobSample("a", Status.DONE, None, None, ago(50), ago(10)), JobSample("b", Status.QUEUED)]
    snap = summarize(jobs, [], [], [], NOW, horizon=60)
    assert snap.eta_seconds == pytest.approx(50)  # one volume in the 50 s since work began


def test_sqlite_hands_back_aware_utc_timestamps(tmp_path: Path) -> None:
    """One column type (segq.models.UtcDateTime) makes SQLite's naive values aware: no reader fixes them."""
    from segq.db import session_scope, upgrade
    from segq.models import Dataset

    url = f"sqlite:///{tmp_path / 'segq.db'}"
    upgrade(url)
    with session_scope(url) as s:
        s.add(Dataset(id="d", name="n", out_dir="/o", model_path="/m", model_sha256="0" * 64, params={},
                      created_at=ago(30)))
    with session_scope(url) as s:
        created = s.get(Dataset, "d").created_at  # type: ignore[union-attr]
    assert created.tzinfo is not None and created == ago(30)


def test_render_shows_counts_workers_and_eta() -> None:
    jobs = [JobSample("a", Status.DONE, 8, 2, ago(100), ago(10)), JobSample("b", Status.RUNNING, 8, 2, ago(5))]
    snap = summarize(jobs, [PartSample("b", Status.DONE, 4)], [WorkerTotal("gpu0@box", 3, 12, 3.0)],
                     [RecentPart("gpu0@box", 12, ago(3))], NOW)
    console = Console(width=160, record=True, force_terminal=False)
    console.print(render(snap, "dataset x 'night'"))
    text = console.export_text()
    assert "dataset x 'night'" in text and "1 done" in text and "1 running" in text
    assert "1/2 volumes" in text and "subtasks 3/4" in text and "windows/s" in text and "ETA" in text
    assert "gpu0@box" in text and "4.0" in text
