"""Checks of the Redis broker that Celery does not make: does it persist, does it evict, does it take writes.

A broker that loses messages on restart (no AOF) or evicts keys under memory pressure (any
``maxmemory-policy`` but ``noeviction``) silently drops queued work and chord counters, so a worker
says so loudly at start. A producer probes that Redis accepts a write before it records anything.
Every URL that reaches a log goes through :func:`mask_url`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from segq.errors import ConfigError, TransientError
from segq.names import REDIS_KEY_PREFIX

logger = logging.getLogger("segq.broker")

REDIS_SCHEMES = ("redis", "rediss")


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (user names stay: they are not secret)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def _client(url: str, timeout: float = 5.0) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


def persistence_warnings(url: str) -> list[str]:
    """Why this Redis could lose queued work, one sentence each; empty when it persists and evicts nothing.

    A Redis that hides CONFIG (managed services rename it) cannot be checked; that is said, not assumed.
    """
    if urlsplit(url).scheme not in REDIS_SCHEMES:
        return []
    import redis

    client = _client(url)
    try:
        config = {**client.config_get("appendonly"), **client.config_get("maxmemory-policy")}
    except redis.ResponseError as exc:
        return [f"cannot read the broker's configuration ({exc}); make sure it runs with appendonly yes and "
                "maxmemory-policy noeviction"]
    finally:
        client.close()
    problems = []
    if config.get("appendonly") != "yes":
        problems.append("appendonly is off: a Redis restart loses every queued and running task. "
                        "Run redis-server --appendonly yes (docker-compose.yml does).")
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        problems.append(f"maxmemory-policy is {policy}: under memory pressure Redis deletes queued tasks and chord "
                        "counters without a trace. Set maxmemory-policy noeviction.")
    return problems


def check_credentials(url: str) -> None:
    """ConfigError, in one line naming the fix, when Redis refuses this URL's password (or wants one it lacks).

    Celery would retry such a connection for ever, a traceback each time; no retry can help. A broker that does
    not answer at all is left to Celery's retries: it may be starting. The password is never printed.
    """
    if urlsplit(url).scheme not in REDIS_SCHEMES:
        return
    import redis

    client = _client(url)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        given = "the password in the URL" if urlsplit(url).password else "a connection without a password"
        raise ConfigError(f"the broker at {mask_url(url)} refused {given} ({exc}): put the password its "
                          "requirepass (or ACL user) expects in SEGQ_BROKER_URL, as redis://:PASSWORD@host:port/db "
                          "(SEGQ_RESULT_BACKEND too, if set)") from None
    except redis.RedisError:
        return
    finally:
        client.close()


def warn_if_unsafe(url: str) -> bool:
    """Log the broker's persistence problems at start, loudly; True when there were none."""
    try:
        problems = persistence_warnings(url)
    except Exception as exc:  # redis.ConnectionError and the like: Celery reports the connection itself
        logger.warning("could not check the broker at %s: %s", mask_url(url), exc)
        return False
    for problem in problems:
        logger.warning("BROKER AT %s MAY LOSE WORK: %s", mask_url(url), problem)
    if not problems:
        logger.info("broker at %s persists (appendonly yes) and evicts nothing (noeviction)", mask_url(url))
    return not problems


def check_writable(url: str) -> None:
    """Write and delete a probe key: TransientError, saying why, when Redis refuses writes (memory limit)."""
    if urlsplit(url).scheme not in REDIS_SCHEMES:
        return
    import redis

    client = _client(url)
    key = f"{REDIS_KEY_PREFIX}probe:{uuid.uuid4().hex}"
    try:
        client.set(key, "x" * 1024, ex=60)
        client.delete(key)
    except redis.ResponseError as exc:
        full = "OOM" in str(exc) or "maxmemory" in str(exc)  # redis-py strips the OOM prefix into its class
        hint = (" Redis is at its memory limit: let the workers drain the queues, delete what fills it, or raise "
                "maxmemory." if full else "")
        raise TransientError(f"the broker at {mask_url(url)} refuses writes ({exc}); nothing was queued.{hint}") \
            from exc
    except redis.RedisError as exc:
        raise TransientError(f"cannot reach the broker at {mask_url(url)}: {exc}; nothing was queued") from exc
    finally:
        client.close()


def guard_undecodable_messages() -> None:
    """Drop, with an error in the log, a queue item that is not a JSON envelope, instead of dying of it.

    kombu's Redis transport parses what BRPOP returned without a guard: one item pushed into a queue
    by hand (or by a foreign client) ends the worker with "Unrecoverable error: JSONDecodeError", and a
    restarted worker is fine only because BRPOP already removed the item. Installed at worker start.
    """
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._brpop_read
    if getattr(original, "segq_guarded", False):
        return

    def _brpop_read(self: Any, **options: Any) -> bool:
        try:
            return bool(original(self, **options))
        except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError: the item is already popped
            logger.error("discarded a queue item that is not a Celery message (%s: %s); someone wrote to the "
                         "queue directly", type(exc).__name__, exc)
            return True

    _brpop_read.segq_guarded = True  # type: ignore[attr-defined]
    kombu_redis.Channel._brpop_read = _brpop_read  # type: ignore[method-assign]


def unacked_on_shared_clock() -> None:
    """Stamp and sweep kombu's ``unacked`` index on the shared clock (segq/clock.py), not on each worker's own.

    kombu scores a delivered message with the fetching worker's ``time()`` and every worker restores those older
    than the visibility timeout by its own ``time()``: a worker whose clock ran ahead by more than the visibility
    timeout minus the task's run time handed other workers' running messages out again. Installed at worker start.
    """
    from kombu.transport import redis as kombu_redis

    from segq import clock

    kombu_redis.time = clock.timestamp
