"""A worker that is told to go (SIGTERM: a spot machine's notice, a cluster scaling down) leaves without loss.

Celery's warm shutdown on SIGTERM stops consuming at once and then waits for the running tasks for ever;
its soft shutdown (``worker_soft_shutdown_timeout``, Celery 5.5) only starts on a cold shutdown and then
sleeps the whole timeout whatever the tasks do. So segq keeps the warm shutdown and bounds it itself:

- a GPU part checks at each ROI batch (:class:`PartClock`) whether it ends within ``SEGQ_STOP_GRACE``
  of the signal, by its own pace so far (or this process's last part's, before its first batch); if not,
  it raises :class:`~segq.errors.WorkerLeaving` and the step runner hands its message back to the queue
  (worker/steps.py), its partial never written. A part that can end in time finishes;
- a message that reaches the worker after the signal is handed back before it runs (worker/steps.py);
- a backstop: a worker still alive ``BACKSTOP_SECONDS`` past the grace (a step stuck in a read, a prepare
  or merge in a prefork child) gets SIGQUIT, Celery's cold shutdown, which hands back every message it holds.

``--max-idle N`` (:class:`IdleStep`) sends the worker its own SIGTERM once nothing has run for N seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery import bootsteps
from celery.signals import task_received, worker_shutting_down

from segq.errors import WorkerLeaving
from segq.settings import get_settings

logger = logging.getLogger("segq.leaving")

BACKSTOP_SECONDS = 3.0  # past the grace, before the cold shutdown: within the promised grace + 5 s
IDLE_POLL_SECONDS = 1.0


@dataclass
class Departure:
    """When this process was told to go, and by when its parts must be done or handed back (monotonic)."""

    deadline: float | None = None
    batch_seconds: float | None = None  # the last part's seconds a ROI batch here: a part not started yet


_departure = Departure()
_lock = threading.Lock()


def begin(grace: float) -> bool:
    """Start leaving with ``grace`` seconds for the parts held; False if it had started already."""
    with _lock:
        if _departure.deadline is not None:
            return False
        _departure.deadline = time.monotonic() + grace
        return True


def leaving() -> bool:
    return _departure.deadline is not None


def reset() -> None:
    """Forget a departure (tests of this module only)."""
    with _lock:
        _departure.deadline = None
        _departure.batch_seconds = None


class PartClock:
    """Called before each of a part's ``batches`` ROI batches (and once after the last): raises WorkerLeaving
    when the worker is leaving and the part would not end by the deadline."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.calls = 0
        self.started = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        done = min(self.calls, self.batches)
        if self.calls == 0:
            self.started = now
        self.calls += 1
        pace = (now - self.started) / done if done else _departure.batch_seconds
        if done:
            _departure.batch_seconds = pace
        deadline = _departure.deadline
        if deadline is None or done >= self.batches:
            return
        needed = (pace or 0.0) * (self.batches - done)
        if now + needed > deadline:
            raise WorkerLeaving(f"this worker is leaving (SIGTERM) and the part would end {needed:.1f} s from now, "
                                f"past the grace (SEGQ_STOP_GRACE); {done} of {self.batches} ROI batches were run: "
                                "handed back for another worker")


def _backstop(grace: float) -> None:
    """SIGQUIT this process (Celery's cold shutdown hands back what it holds) if it outlives the grace."""
    time.sleep(grace + BACKSTOP_SECONDS)
    logger.warning("still running %.0f s after SIGTERM: cold shutdown, handing back what this worker holds",
                   grace + BACKSTOP_SECONDS)
    os.kill(os.getpid(), signal.SIGQUIT)


@worker_shutting_down.connect
def _on_shutting_down(sig: Any = None, how: Any = None, **_kwargs: Any) -> None:
    """Celery's signal handler, in the worker's main process: a warm shutdown starts the grace."""
    if how != "Warm":
        return
    grace = get_settings().stop_grace
    if begin(grace):
        logger.warning("%s: leaving; parts that end within %.0f s (SEGQ_STOP_GRACE) finish, the others are "
                       "handed back", sig, grace)
        threading.Thread(target=_backstop, args=(grace,), name="segq-stop-backstop", daemon=True).start()


class IdleStep(bootsteps.StartStopStep):
    """A worker bootstep: with ``--max-idle N``, the worker leaves (warm shutdown, exit 0) once no task has
    been received or run for N seconds, for autoscalers that start workers and let them go by themselves."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.max_idle = float(parent.app.conf.get("segq_max_idle") or 0)
        self.last = time.monotonic()
        self.stopped = threading.Event()

    def start(self, parent: Any) -> None:
        if self.max_idle <= 0:
            return
        self.last = time.monotonic()
        task_received.connect(self._received, weak=False)
        threading.Thread(target=self._watch, name="segq-max-idle", daemon=True).start()

    def _received(self, **_kwargs: Any) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        from celery.worker import state

        while not self.stopped.wait(IDLE_POLL_SECONDS):
            if state.active_requests or state.reserved_requests:
                self.last = time.monotonic()
            elif time.monotonic() - self.last >= self.max_idle:
                logger.warning("no work for %.0f s (--max-idle): leaving", self.max_idle)
                self.stopped.set()
                os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, parent: Any) -> None:
        self.stopped.set()
