"""The scheduler's rules: the split rule and the fair pick as plain functions, the admission window on a
real SQLite database and a real Redis (the GPU worker heartbeats)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from segq.scheduler import Waiting, pick, split_parts
from tests.conftest import FRESH_REDIS_URL as REDIS  # no session worker beats there
from tests.helpers import environment


@pytest.mark.parametrize(("windows", "gpus", "backlog", "expected", "why"), [
    (48, 4, 47, 1, "a dataset's volumes run whole while more wait than there are GPUs"),
    (48, 4, 4, 1, "as many waiting as GPUs: whole"),
    (600, 4, 0, 4, "one CT alone on 4 GPUs: spread over all of them"),
    (600, 4, 1, 2, "two volumes left for 4 GPUs: two parts each"),
    (600, 4, 2, 2, "three left: ceil(4 / 3) = 2 parts"),
    (600, 1, 0, 1, "one GPU, SEGQ_LONE_PARTS=1: never split"),
    (600, 1, 0, 2, "one GPU, a lone volume (SEGQ_LONE_PARTS=2): two streamed parts"),
    (600, 1, 1, 1, "one GPU, another volume waiting: whole"),
    (600, 4, 0, 4, "4 GPUs, a lone volume (SEGQ_LONE_PARTS=2): one part a GPU already streams"),
    (100, 1, 0, 1, "a lone volume too small for two parts of 64 windows: whole"),
    (128, 1, 0, 2, "a lone volume of two parts of 64 windows"),
    (48, 8, 0, 3, "a small volume is not cut below two ROI batches a part (48 // 16 = 3)"),
    (10, 4, 0, 1, "fewer windows than two batches: whole"),
    (600, 1, 0, 3, "the per-part cap still cuts: ceil(600 / 256) = 3"),
    (5, 1, 0, 5, "the cap never asks for more parts than windows"),
])
def test_split_rule(windows: int, gpus: int, backlog: int, expected: int, why: str) -> None:
    cap = 256 if why.startswith("the per-part cap") else 1 if why.startswith("the cap never") else 1024
    lone = 2 if "SEGQ_LONE_PARTS=2" in why or "lone volume" in why else 1
    assert split_parts(windows, gpus, backlog, min_windows=16, max_windows=cap, lone_parts=lone) == expected, why


def test_split_rule_refuses_an_empty_volume() -> None:
    with pytest.raises(ValueError, match="at least one window"):
        split_parts(0, 4, 0, 16, 1024)


def _group(name: str, jobs: int, priority: str = "normal", in_flight: int = 0, age: int = 0) -> Waiting:
    from segq.models import utcnow

    return Waiting(name, priority, utcnow() - timedelta(minutes=age), in_flight, [f"{name}{i}" for i in range(jobs)])


def test_pick_shares_room_between_datasets_round_robin() -> None:
    old, new = _group("old", 100, age=10), _group("new", 3)
    assert [job for job, _ in pick([old, new], 6)] == ["old0", "new0", "old1", "new1", "old2", "new2"]


def test_pick_gives_a_later_dataset_room_before_one_with_volumes_in_flight() -> None:
    busy, late = _group("busy", 100, in_flight=4, age=10), _group("late", 10)
    assert [job for job, _ in pick([busy, late], 5)] == ["late0", "late1", "late2", "late3", "busy0"]


def test_pick_serves_higher_priority_first_and_stops_at_the_room() -> None:
    low, high = _group("low", 5, "low", age=10), _group("high", 2, "high")
    assert pick([low, high], 3) == [("high0", "high"), ("high1", "high"), ("low0", "low")]
    assert pick([_group("a", 2)], 0) == []
    assert [job for job, _ in pick([_group("a", 2)], 10)] == ["a0", "a1"], "no more than there is"


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    import redis

    url = f"sqlite:///{tmp_path / 'segq.db'}"
    with environment({"SEGQ_DATABASE_URL": url, "SEGQ_BROKER_URL": REDIS, "SEGQ_DATA_DIR": str(tmp_path),
                      "SEGQ_LOOKAHEAD": "1"}):
        from segq.db import upgrade

        upgrade(url)
        client = redis.Redis.from_url(REDIS)
        client.delete("segq:gpu-workers")
        yield url
        client.delete("segq:gpu-workers")


def _datasets(*sizes: int) -> list[list[str]]:
    from segq.db import session_scope
    from segq.models import Dataset, Job, Status

    ids = []
    with session_scope() as s:
        for d, size in enumerate(sizes):
            ds = Dataset(name=f"d{d}", out_dir="/o", model_path="/m", model_sha256="0" * 64, params={})
            s.add(ds)
            s.flush()
            jobs = [Job(dataset_id=ds.id, input_path=f"/i/{d}/{k:03d}.nii.gz", input_sha256="x", fingerprint="f",
                        output_path=f"/o/{d}/{k:03d}.nii.gz", status=Status.QUEUED) for k in range(size)]
            s.add_all(jobs)
            s.flush()
            ids.append([j.id for j in jobs])
    return ids


def test_admission_fills_the_window_of_the_gpus_present_and_no_more(database: str) -> None:
    from segq import scheduler
    from segq.db import session_scope
    from segq.models import Job, Status
    from segq.settings import get_settings

    first, second = _datasets(10, 4)
    settings = get_settings()
    assert scheduler.gpu_workers(settings) == 1, "no GPU worker beats yet: one worker's room"
    claimed = scheduler._claim(settings, scheduler.gpu_workers(settings))
    assert len(claimed) == 2, "1 GPU x (lookahead 1 + 1)"
    assert {job for job, _, _ in claimed} == {first[0], second[0]}, "both datasets get room"
    assert scheduler._claim(settings, 1) == [], "the window is full"
    for name in ("gpu0@a", "gpu1@a"):
        scheduler.heartbeat(name, settings)
    assert scheduler.gpu_workers(settings) == 2
    assert len(scheduler._claim(settings, scheduler.gpu_workers(settings))) == 2, "a second GPU: 2 more"
    assert scheduler.in_flight() == 4
    with session_scope() as s:  # one finishes: its room goes to the next waiting volume
        s.get(Job, first[0]).status = Status.DONE  # type: ignore[union-attr]
    assert len(scheduler._claim(settings, 2)) == 1
    scheduler.forget_worker("gpu1@a", settings)
    assert scheduler.gpu_workers(settings) == 1
    assert scheduler.backlog() == 14 - 1, "every unfinished volume not yet running waits for a GPU"


def test_stale_admissions_give_their_room_back(database: str) -> None:
    from segq import scheduler
    from segq.settings import get_settings

    _datasets(3)
    settings = get_settings()
    assert len(scheduler._claim(settings, 1)) == 2
    assert scheduler.release_stale_admissions(settings, older_than=3600) == 0, "young admissions stay"
    assert scheduler.release_stale_admissions(settings, older_than=-1) == 2
    assert scheduler.in_flight() == 0
