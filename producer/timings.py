"""Where `segq submit` spends its time before a volume's prepare can start (``segq submit --timings``).

A user waiting for one urgent volume waits for `segq submit` too: the interpreter's start, its imports, its
checks, the job row and the first prepare message are on the way to the mask; the content hash is not (it is
recorded after the prepare message is sent, producer/submit.py). Every mark is seconds since this process
started, read from /proc so that the interpreter's own start-up counts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc/uptime less the process' start in clock ticks); None
    where /proc cannot tell."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # Field 22 (starttime), counted after the ")" that ends the command name, which may hold spaces.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def process_origin() -> float:
    """This process' start on the monotonic clock (where /proc cannot tell: now)."""
    return time.monotonic() - (process_age() or 0.0)


@dataclass
class Timings:
    """Named moments of one `segq submit` (seconds since its process started) and spans (start, end) such as each
    input's hash. Thread-safe: the hashing threads add their spans."""

    origin: float = field(default_factory=process_origin)
    marks: dict[str, float] = field(default_factory=dict)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def now(self) -> float:
        return time.monotonic() - self.origin

    def mark(self, name: str) -> None:
        """Record ``name`` now, once: the first time counts (the first prepare message, the first job row)."""
        with self._lock:
            self.marks.setdefault(name, round(self.now(), 3))

    def span(self, name: str, started: float, finished: float) -> None:
        """Record a span given in seconds since the process started."""
        with self._lock:
            self.spans[name] = (round(started, 3), round(finished, 3))

    def as_dict(self) -> dict[str, Any]:
        """Marks, spans, and the hashing's extent (first start to last end) with its length."""
        with self._lock:
            out: dict[str, Any] = {f"{name}_s": value for name, value in self.marks.items()}
            hashes = [span for name, span in self.spans.items() if name.startswith("hash ")]
            spans = dict(self.spans)
        if hashes:
            start, end = min(a for a, _ in hashes), max(b for _, b in hashes)
            out.update(hash_started_s=start, hash_finished_s=end, hash_seconds=round(end - start, 3))
        out["spans"] = {name: list(span) for name, span in spans.items()}
        return out

    def line(self) -> str:
        """One line for stderr: ``timings {json}``, machine-readable (bench/simulate.py reads it)."""
        return "timings " + json.dumps(self.as_dict(), sort_keys=True)
