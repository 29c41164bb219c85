"""The leaving rule (worker/leaving.py) and segq watch's join/leave lines, as plain functions."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from producer.watch import roster_lines
from segq.errors import WorkerLeaving
from worker import leaving


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    leaving.reset()
    yield
    leaving.reset()


def test_a_part_runs_on_when_the_worker_stays() -> None:
    clock = leaving.PartClock(3)
    for _ in range(4):
        clock()


def test_a_part_that_ends_within_the_grace_finishes() -> None:
    clock = leaving.PartClock(2)
    clock()
    time.sleep(0.05)
    assert leaving.begin(10.0) and not leaving.begin(10.0)
    clock()  # one batch of 0.05 s left, 10 s of grace
    clock()  # after the last batch: never handed back


def test_a_part_that_would_outlast_the_grace_is_handed_back_and_the_pace_carries_to_the_next() -> None:
    clock = leaving.PartClock(10)
    clock()
    time.sleep(0.1)
    leaving.begin(0.3)
    with pytest.raises(WorkerLeaving, match="1 of 10 ROI batches"):
        clock()  # 9 batches of 0.1 s left, 0.3 s of grace
    with pytest.raises(WorkerLeaving, match="0 of 10"):
        leaving.PartClock(10)()  # not started: this process's last pace says 1 s


def test_past_the_deadline_even_an_unmeasured_part_goes_back() -> None:
    leaving.begin(0.0)
    time.sleep(0.01)
    with pytest.raises(WorkerLeaving):
        leaving.PartClock(1)()


def test_roster_lines_say_who_joined_and_left() -> None:
    assert roster_lines(None, {"gpu0@a"}) == ["GPU workers: gpu0@a"]
    assert roster_lines({"gpu0@a"}, {"gpu0@a", "gpu1@b"}) == ["gpu1@b joined: engine ready, taking GPU work "
                                                              "(2 GPU worker(s) now)"]
    assert roster_lines({"gpu0@a", "gpu1@b"}, {"gpu1@b"}) == ["gpu0@a left (1 GPU worker(s) now)"]
    assert roster_lines({"gpu0@a"}, None) == [] and roster_lines({"gpu0@a"}, {"gpu0@a"}) == []
