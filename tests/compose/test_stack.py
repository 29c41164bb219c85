"""The stack of docker-compose.yml, run for real: images built, a dataset segmented through the containers.

Run by scripts/compose-test.sh, which builds the images first (segq:test, segq-test/redis,
segq-test/postgres) and starts the engine; docker-compose.test.yml swaps in what this machine can build.
The tests share one stack and run in file order: a dataset, Flower, then the faults. Every mask is
compared with the masks of the same scans segmented outside containers, by a host worker.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import FRESH_REDIS_URL, _flush, _stack
from tests.helpers import ROOT
from tests.integration.test_compose import compose_client
from tests.integration.test_pipeline import segq

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = "segqcompose"
FILES = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.test.yml")]
FLOWER_USER, FLOWER_PASSWORD = "admin", "fl0wer-c0mpose"
SETTINGS = {
    "SEGQ_REDIS_PASSWORD": "r3dis-c0mpose",
    "SEGQ_POSTGRES_PASSWORD": "p0stgres-c0mpose",
    "SEGQ_FLOWER_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}",
    "SEGQ_IMAGE": "segq:test",
    "SEGQ_REDIS_PORT": "16379",      # clear of the host's own Redis and PostgreSQL
    "SEGQ_POSTGRES_PORT": "15432",
    "SEGQ_FLOWER_PORT": "15555",
    # A killed worker's task comes back after this, not the production 2 h.
    "SEGQ_TASK_TIME_LIMIT": "60",
    "SEGQ_VISIBILITY_TIMEOUT": "75",
}
COUNT = 6
LOOKAHEAD_WINDOW = 4  # one device worker x (SEGQ_LOOKAHEAD 3 + 1): volumes prepared or running at once
# One scan set per dataset, each its own seed: segq copies the mask of a scan it has already segmented
# (same content and model) instead of queueing it again, which would leave the faults nothing to hit.
SEEDS = {"main": 4243, "aof": 4244, "killed": 4245}
MODEL = "/data/models/demo/model.toml"
Masks = dict[str, np.ndarray]  # file name -> mask


class Compose:
    """docker-compose for one project and its data directory, mounted at /data in the segq containers."""

    def __init__(self, data: Path) -> None:
        client = compose_client()
        assert client is not None, "no compose client: scripts/compose-test.sh installs docker-compose"
        self.client = client
        self.data = data
        # Removing a container on the vfs storage driver deletes a full copy of its image, which can take longer
        # than docker-compose's 60 s default read timeout on a two-core machine (CI failed on it once).
        self.env = {"COMPOSE_HTTP_TIMEOUT": "600", "DOCKER_CLIENT_TIMEOUT": "600",
                    **os.environ, **SETTINGS, "SEGQ_HOST_DATA": str(data)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.client, "-p", PROJECT, *FILES, *args], env=self.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    def segq(self, *args: str, timeout: float = 600) -> str:
        """`segq ...` inside the coordinator's container, against the stack's Redis and PostgreSQL."""
        return self("exec", "-T", "coordinator", "segq", *args, timeout=timeout).stdout

    def submit(self, name: str, *extra: str) -> str:
        return self.segq("submit", f"/data/scans/{name}", "--out", f"/data/masks/{name}", "--model", MODEL,
                         "--name", name, *extra)

    def results(self, name: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.segq("results", name, "--format", "json"))
        return rows

    def done(self, name: str) -> int:
        return sum(row["status"] == "done" for row in self.results(name))

    def wait_done(self, name: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.results(name)
            if len(rows) == COUNT and all(row["status"] == "done" for row in rows):
                return rows
            assert not any(row["status"] == "failed" for row in rows), rows
            time.sleep(2)
        raise AssertionError(f"{name} not done after {timeout}s: {self.results(name)}\n{self.logs()}")

    def pause_worker_in_slab(self, name: str, seconds: int = 20) -> Path:
        """Submit dataset ``name`` with the worker armed to pause once in each of its two threads (a device worker
        runs a part on the device and prefetches the next), inside a slab; return when both do."""
        faults = self.data / "faults"
        for stale in faults.glob("*"):
            stale.unlink()
        armed = f"pause_in_infer_slab:seconds={seconds}:times=2"
        (faults / "faults").write_text(armed)
        self.submit(name)
        key = armed.replace(":", "_").replace("=", "_")
        deadline = time.monotonic() + 120
        while not (faults / f"{key}.hit2").exists():
            assert time.monotonic() < deadline, f"the worker's threads never paused in slabs of {name}\n{self.logs()}"
            time.sleep(0.2)
        (faults / "faults").unlink()
        return faults / f"{key}.hit1"

    def queued(self) -> int:
        """Messages waiting in Redis on the gpu queue."""
        return int(self("exec", "-T", "redis", "redis-cli", "llen", "gpu").stdout.strip())

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "40", check=False).stdout


def read_masks(directory: Path) -> Masks:
    masks = {path.name: np.asarray(nib.load(path).dataobj) for path in sorted(directory.glob("*.nii*"))}
    assert masks, f"no mask in {directory}"
    return masks


def assert_masks_equal(directory: Path, reference: Masks) -> None:
    masks = read_masks(directory)
    assert sorted(masks) == sorted(reference)
    for name, mask in masks.items():
        assert mask.shape == reference[name].shape, name
        differ = int(np.count_nonzero(mask != reference[name]))
        assert differ == 0, f"{name}: {differ} voxels differ from the run outside containers"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host directory mounted at /data: demo scans and the shipped demo model, owned by the containers' uid."""
    data = tmp_path_factory.mktemp("compose") / "data"
    (data / "scans").mkdir(parents=True)
    for name, seed in SEEDS.items():
        segq("demo-data", "-o", str(data / "demo" / name), "--count", str(COUNT), "--seed", str(seed), env={})
        shutil.move(data / "demo" / name / "images", data / "scans" / name)
    shutil.copytree(ROOT / "models" / "demo", data / "models" / "demo")
    (data / "masks").mkdir()
    (data / "faults").mkdir()
    for path in [data, *data.rglob("*")]:
        os.chown(path, 1000, 1000)
    return data


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> dict[str, Masks]:
    """The same scans segmented outside containers: a host worker, the host's Redis and SQLite."""
    root = tmp_path_factory.mktemp("outside")
    _flush(FRESH_REDIS_URL)
    for stack in _stack(root, FRESH_REDIS_URL, f"sqlite:///{root / 'segq.db'}"):
        stack.worker("outside")
        for name in SEEDS:
            segq("submit", str(data / "scans" / name), "--out", str(root / "masks" / name), "--model",
                 str(data / "models" / "demo" / "model.toml"), "--name", name, "--wait", "--timeout", "600",
                 env=stack.env)
    _flush(FRESH_REDIS_URL)
    return {name: read_masks(root / "masks" / name) for name in SEEDS}


@pytest.fixture(scope="module")
def stack(data: Path) -> Iterator[Compose]:
    compose = Compose(data)
    compose("down", "-v", "--remove-orphans", check=False)
    try:
        compose("up", "-d")
        yield compose
    finally:
        print(compose.logs())
        compose("down", "-v", "--remove-orphans", check=False)


def test_worker_service_keeps_the_production_settings(stack: Compose) -> None:
    """docker-compose.test.yml repeats x-segq for its CPU worker: the same environment and volume."""
    import yaml

    services = yaml.safe_load(stack("config").stdout)["services"]
    assert services["gpu"]["profiles"] == ["gpu"]  # not started here: no GPU
    assert stack("ps", "--services", "--filter", "status=running").stdout.split().count("gpu") == 0
    worker = {**services["worker"], "environment": dict(services["worker"]["environment"])}
    assert worker["environment"].pop("SEGQ_FAULTS_DIR") == "/data/faults"
    for key in ("environment", "volumes", "user", "image", "init", "restart", "stop_grace_period"):
        assert worker[key] == services["coordinator"][key], key
    redis = services["redis"]["command"]
    assert redis[redis.index("--requirepass") + 1] == SETTINGS["SEGQ_REDIS_PASSWORD"]
    assert "--appendonly" in redis and "noeviction" in redis


def test_dataset_through_the_stack(stack: Compose, reference: dict[str, Masks]) -> None:
    stack.submit("main", "--wait", "--timeout", "600")
    assert_masks_equal(stack.data / "masks" / "main", reference["main"])
    rows = stack.results("main")
    assert len(rows) == COUNT and all(row["status"] == "done" for row in rows), rows
    workers = {w for row in rows for w in str(row.get("workers") or "").replace(",", " ").split()}
    assert any(w.startswith("cpu0@") for w in workers), rows
    database = stack("exec", "-T", "postgres", "psql", "-U", "segq", "-d", "segq", "-tAc",
                     "select count(*) from jobs").stdout
    assert int(database.strip()) >= COUNT


def flower(path: str, password: str | None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{SETTINGS['SEGQ_FLOWER_PORT']}{path}")
    if password is not None:
        token = base64.b64encode(f"{FLOWER_USER}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_flower_lists_the_workers_only_with_its_password(stack: Compose) -> None:
    deadline = time.monotonic() + 120
    workers: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status, workers = flower("/api/workers?refresh=1", FLOWER_PASSWORD)
        except (urllib.error.URLError, ConnectionError):
            status, workers = 0, {}
        names = set(workers or {})
        if status == 200 and any(n.startswith("coord@") for n in names) and any(n.startswith("cpu0@") for n in names):
            break
        time.sleep(2)
    assert status == 200 and any(n.startswith("cpu0@") for n in workers), (status, workers)
    assert flower("/api/workers", None)[0] == 401
    assert flower("/api/workers", "wrong")[0] == 401


def test_redis_restart_mid_dataset_loses_nothing(stack: Compose, reference: dict[str, Masks]) -> None:
    """Redis restarts while the worker is inside the first volume's slab and the other subtasks wait in
    Redis: the AOF brings them back, and the dataset finishes."""
    hit = stack.pause_worker_in_slab("aof")
    # Two parts held by the paused worker; the look-ahead (1 worker x (3 + 1)) lets two more wait in Redis,
    # and the last two volumes wait in PostgreSQL until there is room.
    expected = min(COUNT, LOOKAHEAD_WINDOW) - 2
    deadline = time.monotonic() + 60
    while (queued := stack.queued()) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert queued == expected and stack.done("aof") == 0, queued
    stack("restart", "redis")
    assert hit.exists() and stack.queued() == queued, "the queued subtasks did not survive the restart"
    stack.wait_done("aof", timeout=600)
    assert_masks_equal(stack.data / "masks" / "aof", reference["aof"])


def test_worker_killed_then_started_finishes_the_dataset(stack: Compose, reference: dict[str, Masks]) -> None:
    """The worker is killed inside a slab; started again, it gets that slab back (after the visibility
    timeout) and the rest of the dataset."""
    stack.pause_worker_in_slab("killed")
    stack("kill", "worker")
    assert stack.done("killed") == 0
    stack("up", "-d", "worker")
    stack.wait_done("killed", timeout=600)
    assert_masks_equal(stack.data / "masks" / "killed", reference["killed"])


def test_down_and_up_keep_database_and_masks(stack: Compose, reference: dict[str, Masks]) -> None:
    stack("down")
    stack("up", "-d")
    for name in SEEDS:
        rows = stack.results(name)
        assert len(rows) == COUNT and all(row["status"] == "done" for row in rows), (name, rows)
        assert_masks_equal(stack.data / "masks" / name, reference[name])
