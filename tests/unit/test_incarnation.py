"""Which start of a worker runs a subtask (segq/incarnation.py), and dropping a superseded attempt's delivered
messages (segq/deadworkers.py); against a real Redis (SEGQ_TEST_REDIS_URL), flushed by the fixture."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from segq import incarnation
from segq.deadworkers import UNACKED_INDEX_KEY, UNACKED_KEY, drop_delivered
from segq.names import INCARNATIONS_KEY, attempt_task_prefix, slab_task_id


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    import redis

    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()


def test_a_subtask_of_an_earlier_start_is_replaced() -> None:
    latest = {"w1@h": "new"}
    assert incarnation.replaced("w1@h", "old", latest)
    assert not incarnation.replaced("w1@h", "new", latest)
    assert not incarnation.replaced("w1@h", None, latest)  # recorded before tokens: unknown, never taken
    assert not incarnation.replaced("w2@h", "old", latest)  # no entry (Redis restarted empty): unknown


def test_each_start_has_its_own_token() -> None:
    first, second = incarnation.begin(), incarnation.begin()
    assert first != second and incarnation.current() == second and len(second) <= 64


def test_a_new_start_takes_the_name_and_refresh_puts_back_only_a_lost_entry(client: Any) -> None:
    incarnation.announce(client, "w1@h", "old")
    token = incarnation.begin()
    incarnation.announce(client, "w1@h", token)
    assert incarnation.refresh(client, "w2@h") == {"w1@h": token, "w2@h": token}
    client.hset(INCARNATIONS_KEY, "w2@h", "someone else")  # two live workers under one name: no tug of war
    assert incarnation.refresh(client, "w2@h")["w2@h"] == "someone else"
    client.delete(INCARNATIONS_KEY)  # Redis restarted empty
    assert incarnation.refresh(client, "w1@h") == {"w1@h": token}


def _deliver(client: Any, tag: str, task_id: str) -> None:
    message = {"body": "", "headers": {"id": task_id}, "properties": {"delivery_tag": tag}}
    client.hset(UNACKED_KEY, tag, json.dumps([message, "", "gpu"]))
    client.zadd(UNACKED_INDEX_KEY, {tag: 1.0})


def test_only_the_superseded_attempts_delivered_messages_are_dropped(client: Any) -> None:
    _deliver(client, "t1", slab_task_id("job1", 0, 1))
    _deliver(client, "t2", slab_task_id("job1", 1, 1))  # the new attempt
    _deliver(client, "t3", slab_task_id("job10", 0, 1))  # another job whose id starts alike
    assert drop_delivered(client, attempt_task_prefix("job1", 0)) == 1
    assert sorted(client.hkeys(UNACKED_KEY)) == [b"t2", b"t3"]
    assert sorted(client.zrange(UNACKED_INDEX_KEY, 0, -1)) == [b"t2", b"t3"]
    assert drop_delivered(client, attempt_task_prefix("job1", 0)) == 0
