"""A throwaway ``redis-server`` for fault tests: its own port, its own directory, AOF on.

The fault tests restart it (crash and recover from the append-only file), cut its clients' connections
and starve it of memory, which they must never do to a Redis that other tests or engineers share.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; ``appendfsync always`` so a SIGKILL loses nothing acknowledged."""

    def __init__(self, directory: Path, *, appendonly: bool = True, policy: str = "noeviction",
                 password: str | None = None, extra: list[str] | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.policy = policy
        self.password = password
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis.from_url(self.url(db), socket_connect_timeout=2, socket_timeout=10)

    def start(self, timeout: float = 10) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always", "--save", "",
               "--maxmemory-policy", self.policy, "--logfile", str(self.log), "--protected-mode", "no",
               *(["--requirepass", self.password] if self.password else []), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.read_log()[-2000:]}")
            try:
                if self.client().ping():
                    return self
            except Exception:  # redis.ConnectionError or BusyLoadingError while the AOF loads
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} not up after {timeout}s: {self.read_log()[-2000:]}")

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def crash(self) -> None:
        """SIGKILL: what the AOF (fsync always) holds is all that survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.crash()

    def restart(self, down_for: float = 0.0) -> float:
        """Crash the server and start it again on the same port and directory; returns seconds it was down."""
        started = time.monotonic()
        self.crash()
        time.sleep(down_for)
        self.start()
        return time.monotonic() - started

    def cut_clients(self) -> int:
        """Close every client connection but this one (what a network cut does to the workers)."""
        return int(self.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")) + int(
            self.client().execute_command("CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "yes"))

    def starve(self) -> None:
        """Set maxmemory below what is in use: with noeviction every write is refused with an OOM error."""
        used = int(self.client().info("memory")["used_memory"])
        self.client().config_set("maxmemory", max(used // 2, 1))

    def feed(self) -> None:
        self.client().config_set("maxmemory", 0)

    def pending(self, db: int = 0) -> dict[str, int]:
        """Messages still in Redis: every list (a queue) with its length, and the unacked hash. Replies to a
        control command (a dead-worker sweep's ping) that came after the sender stopped waiting are not work."""
        client = self.client(db)
        found: dict[str, int] = {}
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            name = key.decode(errors="replace")
            if kind == b"list" and not name.endswith(".reply.celery.pidbox"):  # a ping's answer that came late
                found[name] = int(client.llen(key))
            elif kind == b"hash" and name == "unacked":
                found[name] = int(client.hlen(key))
        return {k: v for k, v in found.items() if v}

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
