"""Which start of a worker this process belongs to: a token made once a worker start, before its pool forks.

A worker's name says where work runs, not which process runs it: systemd, a StatefulSet or the launcher start
a killed worker again under its old name, and the new process answers Celery's ping for the dead one. So every
start gets a token (process id, start time, a random part), each subtask records the token of the start that
runs it, and Redis holds each name's latest token (``segq.names.INCARNATIONS_KEY``). A subtask whose token is
not its worker's latest was left by an earlier start, which is dead: segq/deadworkers.py takes it back.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from segq import clock
from segq.names import INCARNATIONS_KEY

_token: str | None = None


def begin() -> str:
    """Make this process's token (the worker command calls it once, before Celery forks its pool)."""
    global _token
    _token = f"{os.getpid()}-{int(clock.local_time() * 1000)}-{uuid.uuid4().hex[:8]}"
    return _token


def current() -> str | None:
    """The token of the worker start this process belongs to (a pool process inherits its parent's); None outside
    a worker started by ``segq worker``."""
    return _token


def announce(client: Any, worker: str, token: str) -> None:
    """Make ``token`` the latest start of ``worker`` in Redis (at the worker's start, before it takes work)."""
    client.hset(INCARNATIONS_KEY, worker, token)


def refresh(client: Any, worker: str) -> dict[str, str]:
    """Every name's latest start, after putting back this process's own if Redis lost it (restarted empty).

    Only a missing entry is written: two live workers under one name (a mistake Celery warns about) would
    otherwise take each other's work back in turns."""
    token = current()
    if token is not None:
        client.hsetnx(INCARNATIONS_KEY, worker, token)
    return {_text(k): _text(v) for k, v in client.hgetall(INCARNATIONS_KEY).items()}


def replaced(worker: str, token: str | None, latest: dict[str, str]) -> bool:
    """True when the start ``token`` of ``worker`` is no longer its latest: a newer process took the name, so the
    one that ran the subtask is dead. Unknown (None, or no entry) is never taken as replaced."""
    newest = latest.get(worker)
    return token is not None and newest is not None and newest != token


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
