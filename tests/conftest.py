"""Fixtures for real-service tests: a Redis database of our own, SQLite and PostgreSQL, real workers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import WorkerProcess, environment, write_model

REDIS_URL = os.environ.get("SEGQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
# Tests that start, kill or starve their own workers use another database, so the session worker
# never takes their tasks.
FRESH_REDIS_URL = os.environ.get("SEGQ_TEST_FRESH_REDIS_URL", "redis://127.0.0.1:6379/14")
POSTGRES_URL = os.environ.get("SEGQ_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def _flush(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database flushed before and after the session."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"integration tests need Redis at {REDIS_URL} (set SEGQ_TEST_REDIS_URL): {exc}")
    _flush(REDIS_URL)
    yield REDIS_URL
    _flush(REDIS_URL)




def _postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"segq_test_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # OperationalError when the server is absent
        pytest.fail(f"PostgreSQL tests need a server at {POSTGRES_URL} (set SEGQ_TEST_POSTGRES_URL): {exc}")
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    from segq import db

    db.clear_caches()
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def unet_model(models_dir: Path) -> Path:
    """A tiny UNet (ROI 32): fast enough for most pipeline tests on two cores."""
    return write_model(models_dir / "unet", "UNet", roi=32, feature_size=4)


@pytest.fixture(scope="session")
def swin_model(models_dir: Path) -> Path:
    """The smallest SwinUNETR that works: feature_size 12, ROI 64 (32 fails in its deepest stage)."""
    return write_model(models_dir / "swin", "SwinUNETR", roi=64, feature_size=12, sw_batch_size=2)


class Stack:
    """One test deployment: environment, storage, database and the workers serving it."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env = env
        self.root = root
        self.workers: list[WorkerProcess] = []

    def worker(self, name: str = "w1", **kwargs: object) -> WorkerProcess:
        proc = WorkerProcess(self.env, name, self.root / f"{name}-{uuid.uuid4().hex[:4]}.log", **kwargs)  # type: ignore[arg-type]
        self.workers.append(proc)
        return proc.start()

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.workers.clear()


def _forget_storage(url: str) -> None:
    import redis

    from segq.names import STORAGE_KEY

    redis.Redis.from_url(url).delete(STORAGE_KEY)


def _stack(root: Path, redis_url: str, db_url: str) -> Iterator[Stack]:
    env = {
        "SEGQ_BROKER_URL": redis_url,
        "SEGQ_DATABASE_URL": db_url,
        "SEGQ_DATA_DIR": str(root / "data"),
        "SEGQ_STORAGE": str(root / "storage"),
        "SEGQ_MAX_WINDOWS_PER_SUBTASK": "4",
        "SEGQ_DEAD_WORKER_INTERVAL": "0",  # tests that kill workers decide when their work comes back
    }
    with environment(env):
        from segq.db import upgrade

        upgrade(db_url)
        _forget_storage(redis_url)  # a new deployment, with a storage of its own, on a Redis database used before
        stack = Stack(env, root)
        try:
            yield stack
        finally:
            stack.stop()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    """A deployment with one running worker, once on SQLite and once on PostgreSQL."""
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    if request.param == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{root / 'segq.db'}"])
    else:
        urls = _postgres_database()
    db_url = next(urls)
    try:
        yield from _with_worker(root, redis_url, db_url)
    finally:
        for _ in urls:
            pass


def _with_worker(root: Path, redis_url: str, db_url: str) -> Iterator[Stack]:
    for stack in _stack(root, redis_url, db_url):
        stack.worker("w1")
        yield stack


@pytest.fixture
def fresh_stack(tmp_path: Path, redis_url: str) -> Iterator[Stack]:
    """A deployment of its own on SQLite with no worker started: for tests that start, kill or starve workers."""
    _flush(FRESH_REDIS_URL)
    yield from _stack(tmp_path, FRESH_REDIS_URL, f"sqlite:///{tmp_path / 'segq.db'}")
    _flush(FRESH_REDIS_URL)
