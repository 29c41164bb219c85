"""One clock for every time that several machines compare: the broker's (Redis ``TIME``).

Heartbeats, a job's ``started_at`` and ``finished_at``, the watchdog's deadline, stale admissions and every figure
computed from them are written on one machine and read on another. A worker whose clock was 10 minutes behind never
counted as a GPU (its heartbeat looked stale), one 10 minutes ahead deleted the others' heartbeats, and a job started
on one and finished on another showed ``elapsed_seconds -595``. So segq reads the wall clock only here: this
machine's clock plus its offset to the broker's, measured with one ``TIME`` round trip at most every
:data:`RESYNC_SECONDS` (and kept when the broker is away). How long something took is measured on the monotonic
clock (:class:`Stopwatch`), never as the difference of two wall-clock readings.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

logger = logging.getLogger("segq.clock")

RESYNC_SECONDS = 60.0  # how often a process measures its offset to the broker again
RETRY_SECONDS = 5.0  # after a failed measurement (the broker away), when to try again
WARN_OFFSET_SECONDS = 5.0  # an offset this large is logged once: the machine's clock needs NTP

_lock = threading.Lock()


def _new_lock() -> None:
    global _lock
    _lock = threading.Lock()  # a pool process forked while another thread held it would wait on it for ever


os.register_at_fork(after_in_child=_new_lock)
_state = {"offset": 0.0, "next": -math.inf, "warned": 0.0}


def local_time() -> float:
    """This machine's wall clock: the only reading of it in segq (a test's ``skew_at_start`` fault shifts it)."""
    return time.time()


def measure(client: object) -> float:
    """Seconds to add to this machine's clock to get the broker's, from one ``TIME`` round trip (half of it
    counted each way)."""
    before = local_time()
    seconds, micros = client.time()  # type: ignore[attr-defined]
    after = local_time()
    return float(seconds) + float(micros) / 1e6 - (before + after) / 2


def offset() -> float:
    """This process's current offset to the broker's clock (0 until one measurement succeeded)."""
    if time.monotonic() >= _state["next"]:
        with _lock:
            if time.monotonic() >= _state["next"]:
                _resync()
    return _state["offset"]


def _resync() -> None:
    from segq.settings import get_settings

    url = get_settings().broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        _state["next"] = math.inf  # no Redis broker (a test app): this machine's clock is the only one
        return
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            value = measure(client)
        finally:
            client.close()
    except (redis.RedisError, OSError):
        _state["next"] = time.monotonic() + RETRY_SECONDS  # keep the last offset: clocks drift slowly
        return
    _state["offset"], _state["next"] = value, time.monotonic() + RESYNC_SECONDS
    if abs(value) >= WARN_OFFSET_SECONDS and abs(value - _state["warned"]) >= WARN_OFFSET_SECONDS:
        _state["warned"] = value
        logger.warning("this machine's clock is %.0f s %s the broker's; segq uses the broker's clock for what "
                       "machines compare, but fix this machine's time (NTP: timedatectl set-ntp true)",
                       abs(value), "behind" if value > 0 else "ahead of")


def set_offset(value: float) -> None:
    """Use ``value`` as the offset from now on, without measuring (tests; a process that measured elsewhere)."""
    _state["offset"], _state["next"] = value, time.monotonic() + RESYNC_SECONDS


def timestamp() -> float:
    """The broker's time now, in seconds since the epoch."""
    return local_time() + offset()


def now() -> datetime:
    """The broker's time now, timezone-aware UTC: what every timestamp stored in SQL or Redis holds."""
    return datetime.fromtimestamp(timestamp(), UTC)


def redis_time(client: object) -> float:
    """The time of the Redis server ``client`` talks to (for a score that other machines compare at once)."""
    seconds, micros = client.time()  # type: ignore[attr-defined]
    return float(seconds) + float(micros) / 1e6


@dataclass
class Stopwatch:
    """A span that starts at the shared clock's now and lasts what the monotonic clock measured, so its
    duration is right even when the offset is measured again (or the machine's clock steps) meanwhile."""

    started: datetime = field(default_factory=now)
    _mono: float = field(default_factory=time.monotonic)

    def seconds(self) -> float:
        return time.monotonic() - self._mono

    def until_now(self) -> datetime:
        return self.started + timedelta(seconds=self.seconds())

    def span(self) -> tuple[datetime, datetime]:
        return self.started, self.until_now()


@dataclass
class Phases:
    """A step's phases one after another (prepare's load, plan, workspace ...), for one log line: where a volume's
    seconds went, read from the worker logs (bench/scale_gpus.py keeps them)."""

    _last: float = field(default_factory=time.perf_counter)
    spans: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, name: str) -> None:
        """The phase ``name`` ended now (it began where the last one ended)."""
        now = time.perf_counter()
        self.spans.append((name, now - self._last))
        self._last = now

    def line(self) -> str:
        return ", ".join(f"{name} {seconds:.3f} s" for name, seconds in self.spans)
