"""The shared clock (segq/clock.py): the offset to the broker's, and the one reader of the wall clock."""

from __future__ import annotations

import re
import time
from pathlib import Path

from segq import clock

ROOT = Path(__file__).resolve().parents[2]


class FakeRedis:
    """TIME of a server whose clock is ``ahead`` seconds ahead of this process's (pure logic: no Redis)."""

    def __init__(self, ahead: float) -> None:
        self.ahead = ahead

    def time(self) -> tuple[int, int]:
        now = time.time() + self.ahead
        return int(now), int((now % 1) * 1e6)


def test_offset_is_the_servers_clock_minus_ours() -> None:
    assert abs(clock.measure(FakeRedis(600.0)) - 600.0) < 0.05
    assert abs(clock.measure(FakeRedis(-42.5)) + 42.5) < 0.05


def test_now_adds_the_offset() -> None:
    saved = clock.offset()
    try:
        clock.set_offset(-600.0)
        assert abs(clock.timestamp() - (time.time() - 600.0)) < 0.05
        assert abs(clock.now().timestamp() - (time.time() - 600.0)) < 0.05
    finally:
        clock.set_offset(saved)


def test_a_stopwatch_measures_on_the_monotonic_clock_whatever_the_offset_does() -> None:
    saved = clock.offset()
    try:
        watch = clock.Stopwatch()
        clock.set_offset(saved + 600.0)  # the offset measured again (or the clock stepped) mid-step
        time.sleep(0.05)
        start, end = watch.span()
        assert 0.04 < (end - start).total_seconds() < 1.0
    finally:
        clock.set_offset(saved)


def test_no_module_reads_the_wall_clock_but_segq_clock() -> None:
    """Every wall-clock time that machines compare must come from segq.clock (faults.py records test hits)."""
    pattern = re.compile(r"datetime\.now\(|datetime\.utcnow\(|\btime\.time\(\)|\btime_ns\(\)")
    allowed = {ROOT / "segq" / "clock.py", ROOT / "segq" / "faults.py"}
    found = [f"{path.relative_to(ROOT)}:{n}" for folder in ("segq", "worker", "producer")
             for path in sorted((ROOT / folder).rglob("*.py")) if path not in allowed
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
