"""Issue 24, item 11: starting workers (several at once on a fresh SQLite file; a wrong Redis password)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, WorkerProcess
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env(root: Path, broker: str) -> dict[str, str]:
    return {"SEGQ_BROKER_URL": broker, "SEGQ_DATABASE_URL": f"sqlite:///{root / 'segq.db'}",
            "SEGQ_DATA_DIR": str(root / "data"), "SEGQ_STORAGE": str(root / "storage"),
            "SEGQ_WATCHDOG_INTERVAL": "0", "SEGQ_DEAD_WORKER_INTERVAL": "0"}


def _tables(db: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


def test_processes_creating_the_schema_at_once_on_a_fresh_file(tmp_path: Path) -> None:
    """Six processes open one fresh SQLite file at the same moment, four times over: each gets the schema, none
    crashes (before: "database is locked" on PRAGMA journal_mode=WAL, or "table datasets already exists")."""
    code = "from segq.db import ensure_schema, session_scope; ensure_schema(); session_scope().__enter__()"
    for round_ in range(4):
        root = tmp_path / f"r{round_}"
        root.mkdir()
        env = {**os.environ, **_env(root, "memory://")}
        gate = root / "go"
        start = f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.001)\n{code}"
        procs = [subprocess.Popen([sys.executable, "-c", start], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
        time.sleep(1.5)  # every process is past its imports, polling for the gate
        gate.touch()
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), [e[-600:] for e in errors if e]
        assert "datasets" in _tables(root / "segq.db")


def test_workers_started_at_once_on_a_fresh_file(tmp_path: Path) -> None:
    """Three real `segq worker` processes started together on a fresh SQLite file, twice: all three get ready."""
    with RedisServer(tmp_path / "redis") as redis:
        for round_ in range(2):
            root = tmp_path / f"r{round_}"
            root.mkdir()
            env = _env(root, redis.url(round_))
            workers = [WorkerProcess(env, f"s{k}", root / f"s{k}.log") for k in range(3)]
            try:
                procs = [_spawn(w) for w in workers]  # all three at once: start() would wait for each to be ready
                deadline = time.monotonic() + 180
                while not all(" ready." in w.read_log() for w in workers):
                    dead = [w.name for w, p in zip(workers, procs, strict=True) if p.poll() is not None]
                    assert not dead, f"round {round_}: {dead} exited:\n" + "\n".join(w.read_log()[-3000:]
                                                                                   for w in workers)
                    assert time.monotonic() < deadline, "\n".join(w.read_log()[-2000:] for w in workers)
                    time.sleep(0.5)
                assert "datasets" in _tables(root / "segq.db")
            finally:
                for w in workers:
                    w.kill()


def _spawn(w: WorkerProcess) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "segq.cli", "worker", "-n", f"{w.name}@%h", "-c", "1", "-l", "INFO"]
    with open(w.log, "ab") as handle:
        w.proc = subprocess.Popen(cmd, env=w.env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                  start_new_session=True)
    return w.proc


@pytest.mark.parametrize("launcher", [False, True], ids=["plain", "launcher"])
def test_a_wrong_redis_password_is_one_line_and_a_configuration_exit(tmp_path: Path, launcher: bool) -> None:
    """A password-protected throwaway Redis, a worker given the wrong password: one line naming the fix (no
    password in it), exit 78 (EX_CONFIG), which the launcher does not restart. Before: a traceback at every
    connection retry, for ever."""
    from segq.names import EXIT_CONFIG

    right, wrong = "s3cret-Redis-pw", "wr0ng-Redis-pw"
    with RedisServer(tmp_path / "redis", password=right) as redis:
        env = {**os.environ, **_env(tmp_path, redis.url(0).replace(right, wrong))}
        extra = ["--gpus", "none"] if launcher else []
        run = subprocess.run([sys.executable, "-m", "segq.cli", "worker", "-n", "w@%h", *extra], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == EXIT_CONFIG, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "refused the password" in lines[0] and "SEGQ_BROKER_URL" in lines[0] and "redis://:***@" in lines[0]
    assert right not in output and wrong not in output and "Traceback" not in output
