"""Support for the launcher tests (no tests here): a ``segq worker --gpus`` process and a task that takes its time.

Workers import this module with ``-I tests.integration.test_workers_helpers`` so that ``SLEEP`` is a task
they know; it must not import pytest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from segq.celery_app import app
from tests.helpers import ROOT

SLEEP = "segq.test.sleep"
MODULE = "tests.integration.test_workers_helpers"


@app.task(name=SLEEP, bind=True)
def sleep_task(self: Any, seconds: float, marker: str) -> str:
    """Write ``<marker>.started``, sleep, write ``<marker>.done``: proves a task ran to its end."""
    Path(marker + ".started").write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(marker + ".done").write_text(str(time.time()))
    return str(self.request.hostname)


class Launched:
    """A real ``segq worker --gpus ...`` launcher process and the worker processes it runs."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: int, timeout: float = 120) -> Launched:
        """Start it and wait until ``ready`` workers said " ready."."""
        with open(self.log, "ab") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "segq.cli", "worker", *self.args], env=self.env,
                                         stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.wait_for(" ready.", ready, timeout)
        return self

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.read_log().count(text) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}:\n{self.read_log()[-5000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} x{count} not in the launcher log after {timeout}s:\n"
                                   f"{self.read_log()[-5000:]}")
            time.sleep(0.3)

    def children(self) -> dict[str, int]:
        """Node name -> pid of each worker process the launcher runs now."""
        if self.proc is None:
            return {}
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        found: dict[str, int] = {}
        for pid in map(int, out.split()):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"-n" in argv:
                found[argv[argv.index(b"-n") + 1].decode()] = pid
        return found

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM to the launcher alone (as `docker stop` does); its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """Kill whatever is left: the launcher, then the process group of each worker it runs now."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = self.children()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
