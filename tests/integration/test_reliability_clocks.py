"""Issue 24, item 4: workers whose clocks are 10 minutes off (scenario 30), with real workers on a throwaway Redis.

One worker's ``time.time()`` runs 600 s behind, another's 600 s ahead (the test-only ``skew_at_start`` fault, in
place before Celery and kombu are imported). Every time that machines compare is on the broker's clock
(segq/clock.py): both count as GPUs, neither deletes the other's heartbeat, the ahead one's watchdog fails nothing,
and the figures of the run are those of the test's own (true) clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from segq.db import session_scope
from segq.models import Job, Step
from tests.helpers import write_volume
from tests.reliability import assert_nothing_lost, deployment, figure, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (64, 40, 36)  # at ROI 32, overlap 0.5: 12 windows, 3 parts of 4
SKEW = 600.0


def _heartbeats(client: object) -> list[str]:
    from segq.names import GPU_WORKERS_KEY

    return sorted(m.decode() for m in client.zrange(GPU_WORKERS_KEY, 0, -1))  # type: ignore[attr-defined]


def test_workers_with_skewed_clocks_count_and_report_true_times(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 30. Without the shared clock: the worker behind never counted as a GPU, the one ahead deleted the
    other's heartbeat and (deadline 300 s, 600 s ahead) failed running jobs as stuck, and a job prepared on one and
    merged on the other had ``elapsed_seconds`` near -600 or +600."""
    from producer.results import job_elapsed, summarize
    from segq import scheduler

    settings = {"SEGQ_ADMIT_INTERVAL": "1", "SEGQ_WATCHDOG_INTERVAL": "1", "SEGQ_JOB_DEADLINE": "300"}
    with deployment(tmp_path, **settings) as dep:
        client = dep.redis.client()
        dep.worker("behind", env={"SEGQ_FAULTS": f"skew_at_start:seconds={-SKEW:g}"})
        dep.worker("ahead", env={"SEGQ_FAULTS": f"skew_at_start:seconds={SKEW:g}"})
        assert "TEST FAULT skew" in dep.log()
        wait_for(lambda: len(_heartbeats(client)) == 2, 30, "both heartbeats")
        # Stale after 6 admit intervals (6 s): both must still be there well past that, beat after beat.
        seen = []
        for _ in range(10):
            seen.append(_heartbeats(client))
            time.sleep(1)
        assert all(len(s) == 2 for s in seen), seen
        assert scheduler.gpu_workers() == 2  # admission sizes the window for both GPUs
        logs = dep.log()
        assert "clock is 600 s behind the broker's" in logs and "clock is 600 s ahead of the broker's" in logs

        scans = [write_volume(tmp_path / "scans" / f"v{k}.nii.gz", SHAPE, seed=k) for k in range(4)]
        started = datetime.now(UTC)
        t0 = time.monotonic()
        dep.submit(scans, tmp_path / "out", unet_model)
        rows = dep.wait(240)
        wall = time.monotonic() - t0
        finished = datetime.now(UTC)
        assert_nothing_lost(dep, unet_model, done={p.name for p in scans})
        assert all(r.attempt == 0 for r in rows), rows  # nothing failed as stuck, nothing re-queued

        slack = timedelta(seconds=5)
        with session_scope() as s:
            jobs = list(s.scalars(select(Job)))
            steps = list(s.scalars(select(Step)))
            elapsed = [job_elapsed(j) for j in jobs]
            summary = summarize(jobs)
        for job in jobs:
            assert job.started_at and job.finished_at
            assert started - slack <= job.queued_at <= job.started_at <= job.finished_at <= finished + slack, job.id
        assert all(e is not None and 0 <= e <= wall + 1 for e in elapsed), elapsed
        workers = {st.worker.split("@")[0] for st in steps if st.step != "hash"}  # "hash": segq submit's own step
        assert workers == {"behind", "ahead"}, "both workers must have worked"
        for st in steps:
            assert started - slack <= st.started_at <= st.finished_at <= finished + slack, (st.step, st.worker)
        assert summary["wall_seconds"] is not None and 0 < summary["wall_seconds"] <= wall + 1, summary
        # The run's wall holds each volume's own span, and the throughput is the volumes over that wall: a clock
        # read ahead or behind would stretch or shrink one and not the other.
        assert summary["wall_seconds"] >= max(e or 0.0 for e in elapsed) - 0.01, (summary, elapsed)
        assert summary["volumes_per_hour"] >= len(scans) / (wall + 1) * 3600, (summary, wall)
        assert summary["volumes_per_hour"] == pytest.approx(len(scans) / summary["wall_seconds"] * 3600, rel=0.01)
    figure("30 skewed clocks", f"workers 600 s behind and ahead: 2 of 2 heartbeats kept over 10 s, 4 volumes done "
           f"in {wall:.0f} s, elapsed {min(elapsed):.1f}-{max(elapsed):.1f} s, summary wall "  # type: ignore[type-var]
           f"{summary['wall_seconds']:.1f} s, {summary['volumes_per_hour']:.0f} volumes/h")
