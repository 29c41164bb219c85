"""The steps of an engine's start, timed: what bench/warm_start.py reports and the worker logs when it is ready."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext


class StartClock:
    """Seconds per step of one engine start (CUDA init, network build, checkpoint load, compile, first call,
    gate), in the order they ran, and short notes on how a step went (the gate: ran, cached verdict, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.notes: dict[str, str | float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def line(self) -> str:
        """One log line: ``cuda init 0.4 s, network build 1.2 s, ...``."""
        parts = [f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items()]
        parts += [f"{name}: {note}" for name, note in self.notes.items() if isinstance(note, str)]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, str | float]:
        return {**{name: round(seconds, 3) for name, seconds in self.seconds.items()}, **self.notes}


def timed(clock: StartClock | None, name: str) -> AbstractContextManager[None]:
    """``clock.step(name)``, or nothing when no one is timing this start."""
    return clock.step(name) if clock is not None else nullcontext()
