"""The share of the host's cores a plain worker's processes take (worker/threads.py), as the launcher shares them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from worker import threads
from worker.launcher import plan_children


@pytest.mark.parametrize(("cores", "processes", "expected"), [
    (2, 1, 2), (2, 2, 1), (2, 5, 1), (16, 4, 4), (16, 3, 5), (64, 0, 64), (1, 1, 1),
])
def test_share_is_an_equal_part_of_the_cores_at_least_one(cores: int, processes: int, expected: int) -> None:
    assert threads.share(cores, processes) == expected


def test_the_rule_is_the_launchers() -> None:
    """The launcher's CPU workers on 16 cores: 4 of them get 4 threads each, as share(16, 4) says."""
    specs = plan_children(None, cpu_workers=4, role="gpu", base_env={}, cpu_count=16)
    assert {spec.env["OMP_NUM_THREADS"] for spec in specs} == {str(threads.share(16, 4))}


def _holder(folder: Path, processes: int) -> subprocess.Popen[str]:
    code = ("from pathlib import Path; from worker import threads; "
            f"threads.register({processes}, Path({str(folder)!r})); print('ready', flush=True); "
            "import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_live_workers_are_counted_and_dead_ones_forgotten(tmp_path: Path) -> None:
    first, second = _holder(tmp_path, 2), _holder(tmp_path, 3)
    try:
        assert threads.registered(tmp_path) == 5
        first.kill()
        first.wait(10)
        time.sleep(0.1)
        assert threads.registered(tmp_path) == 3  # the dead worker's lock is free: its file goes
        assert [p.name for p in tmp_path.iterdir()] == [f"{second.pid}.3"]
    finally:
        first.kill()
        second.kill()
        second.wait(10)
    assert threads.registered(tmp_path) == 0
