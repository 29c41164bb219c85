"""Flower against the test broker: our workers and our tasks, by name, with the job id in their arguments."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.helpers import ROOT, write_volume
from tests.integration.test_pipeline import segq
from tests.integration.test_workers_helpers import Launched

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "segq", "flower-test-secret"
TASK_NAMES = {"segq.segment_volume", "segq.infer_slab", "segq.merge"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, auth: bool = True) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            return response.status, json.loads(body) if body.startswith((b"{", b"[")) else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, None


class Flower:
    """`celery -A segq.celery_app flower` as docker-compose.yml runs it: basic auth from FLOWER_BASIC_AUTH."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "segq.celery_app", "flower", "--address=127.0.0.1",
                 f"--port={self.port}"],
                env={**os.environ, **env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}, cwd=ROOT, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if get(f"{self.url}/healthcheck", auth=False)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"flower not up after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def test_flower_shows_our_workers_and_tasks_with_the_job_id(fresh_stack: Stack, unet_model: Path,
                                                           tmp_path: Path) -> None:
    write_volume(tmp_path / "scans" / "ct.nii.gz", (50, 40, 36), seed=3)
    name = f"flower-{tmp_path.name}"
    flower = Flower(fresh_stack.env, tmp_path / "flower.log")
    workers = Launched(fresh_stack.env, tmp_path / "workers.log", "--gpus", "none", "-n", "flowerbox")
    try:
        flower.wait_ready()
        workers.start(ready=2)
        segq("submit", str(tmp_path / "scans"), "--out", str(tmp_path / "out"), "--model", str(unet_model),
             "--name", name, "--wait", "--timeout", "180", "--max-windows-per-subtask", "2", env=fresh_stack.env)
        job_id = json.loads(segq("results", name, "--format", "json", env=fresh_stack.env).stdout)[0]["job"]

        assert get(f"{flower.url}/api/workers", auth=False)[0] == 401
        assert get(f"{flower.url}/api/tasks", auth=False)[0] == 401
        status, found = get(f"{flower.url}/api/workers?refresh=1")
        assert status == 200 and {"cpu0@flowerbox", "coord@flowerbox"} <= set(found), found

        ours: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 30
        while set(ours) != TASK_NAMES and time.monotonic() < deadline:
            status, tasks = get(f"{flower.url}/api/tasks?limit=1000")
            assert status == 200
            ours = {}
            for task in tasks.values():
                if job_id in str(task.get("args")) and task.get("state") == "SUCCESS":
                    ours.setdefault(task["name"], []).append(task)
            time.sleep(0.5)
    finally:
        workers.cleanup()
        flower.stop()
    assert set(ours) == TASK_NAMES, ours
    assert len(ours["segq.infer_slab"]) >= 2
    assert {t["worker"] for t in ours["segq.infer_slab"]} == {"cpu0@flowerbox"}
    assert {t["worker"] for t in ours["segq.segment_volume"] + ours["segq.merge"]} == {"coord@flowerbox"}
