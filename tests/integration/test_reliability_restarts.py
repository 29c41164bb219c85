"""Round three of faults (issue 24): restarts. A worker restarted under its old name, and a Redis restarted empty.

Real workers on a throwaway Redis, real SQLite; every test ends with ``assert_nothing_lost`` (every mask equal
to MONAI's, nothing left in Redis or on disk). Figures for docs/RELIABILITY.md go through ``figure``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from segq.db import session_scope
from segq.models import Job
from segq.names import GPU_QUEUE, PREPARE_QUEUE, consumed_queues
from tests.helpers import write_volume
from tests.reliability import assert_nothing_lost, deployment, figure, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPE = (64, 40, 36)  # at ROI 32, overlap 0.5: 12 windows, 3 parts of 4
GPU_QUEUES = ",".join(consumed_queues(GPU_QUEUE))


def _attempts() -> dict[str, int]:
    with session_scope() as s:
        return {Path(path).name: attempt for path, attempt in s.execute(select(Job.input_path, Job.attempt))}


def test_admitted_jobs_come_back_after_redis_restarted_empty(tmp_path: Path, unet_model: Path) -> None:
    """Scenario 28: Redis without persistence is restarted while two volumes, admitted, wait in the coordinator
    queue (no coordinator has taken them yet) and a third waits in SQL. Redis comes back empty. The GPU worker's
    sweep finds that Redis holds none of the messages the jobs wait on, says so, and re-queues both as new
    attempts; a coordinator started after the restart prepares them; all three complete with no `segq resume`."""
    settings = {"SEGQ_DEAD_WORKER_INTERVAL": "2", "SEGQ_LOOKAHEAD": "1", "SEGQ_ADMIT_INTERVAL": "2",
                "SEGQ_VISIBILITY_TIMEOUT": "300"}  # far beyond the test: only the sweep can bring the work back
    with deployment(tmp_path, appendonly=False, **settings) as dep:
        dep.worker("g", queues=GPU_QUEUES)  # one GPU worker: a window of 2 volumes (look-ahead 1)
        scans = [write_volume(tmp_path / "scans" / f"{n}.nii.gz", SHAPE, seed=i) for i, n in enumerate("abc")]
        dep.submit([tmp_path / "scans"], tmp_path / "out", unet_model)
        client = dep.redis.client(0)
        assert client.llen(PREPARE_QUEUE) == 2, "a and b, admitted, must wait in the coordinator queue"
        dep.redis.restart()
        restarted = time.monotonic()
        assert not dep.redis.pending(), "the restarted Redis must be empty"
        dep.worker("coord", queues=",".join(consumed_queues("finish", PREPARE_QUEUE)))
        seen = "Redis holds none of the 2 messages that admitted and running jobs wait on"
        wait_for(lambda: seen in dep.log(), 90, "the sweep to see the messages gone")
        requeued = time.monotonic() - restarted
        dep.wait(240)
        done = time.monotonic() - restarted
        assert_nothing_lost(dep, unet_model, done={s.name for s in scans})
        attempts = _attempts()
        assert attempts["a.nii.gz"] == 1 and attempts["b.nii.gz"] == 1 and attempts["c.nii.gz"] == 0, attempts
        assert "killed while fetching it" not in dep.log()
    figure("28 Redis restarted empty", f"2 admitted jobs' messages gone; re-queued {requeued:.1f} s after the restart "
           f"(sweep every 2 s, missing twice); all 3 done {done:.1f} s after it")
