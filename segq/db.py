"""Database engine and sessions; SQLite gets WAL and a busy timeout so several workers can write."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from segq.settings import get_settings

logger = logging.getLogger("segq.db")

SQLITE_BUSY_TIMEOUT_MS = 30_000
WAL_TRIES = 40  # about 40 s of waiting in all (segq.db._wal)
SCHEMA_LOCK_KEY = 0x5E9D0003  # pg_advisory_lock: one process at a time checks and migrates the schema
# What an unreachable database raises (down, restarting, refusing or cutting connections; SQLite locked for longer
# than its busy timeout): transient for every caller. POLICY in worker/steps.py retries steps that meet them.
UNAVAILABLE: tuple[type[Exception], ...] = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
# SQLite reports a broken schema as an OperationalError too: that is no outage.
NOT_AN_OUTAGE = ("no such table", "no such column", "syntax error", "has no column")

_outage_lock = threading.Lock()
_outage: dict[str, float | None] = {"since": None}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _wal(cursor: Any) -> None:
    """Put the file in WAL mode, once for good. Switching needs the file to itself, and SQLite answers "database is
    locked" at once (no busy wait) while another process holds it: two workers started together on a fresh file
    crashed so. A file already in WAL mode needs no switch; otherwise wait and try again."""
    import sqlite3

    for attempt in range(WAL_TRIES):
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()
            if mode and str(mode[0]).lower() in ("wal", "memory"):
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_TRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get their directory created and WAL mode."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)


def get_engine(url: str | None = None) -> Engine:
    """The engine of ``url`` (default: the settings' database): one pool per database, however it is named."""
    return _engine(url or get_settings().db_url)


@lru_cache(maxsize=4)
def _engine(url: str) -> Engine:
    return make_engine(url)


@lru_cache(maxsize=4)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(_engine(url), expire_on_commit=False)


def clear_caches() -> None:
    """Forget every engine and session factory (tests that switch databases)."""
    _engine.cache_clear()
    _sessionmaker.cache_clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error; an unreachable database is logged once an
    outage (:func:`note_outage`), not at every attempt."""
    session = _sessionmaker(url or get_settings().db_url)()
    try:
        yield session
        session.commit()
    except BaseException as exc:
        if unavailable(exc):
            note_outage(exc)
        with _quiet_rollback():
            session.rollback()
        raise
    else:
        note_back()
    finally:
        session.close()


@contextmanager
def _quiet_rollback() -> Iterator[None]:
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:  # the connection is gone: nothing to roll back
        if not unavailable(exc):
            raise


def unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be reached now: retry later, never fail a job on it."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, UNAVAILABLE) and not any(m in str(exc) for m in NOT_AN_OUTAGE)


def describe_unavailable(exc: BaseException) -> str:
    """One line for an unreachable database: the server's first line, never SQLAlchemy's statement and links."""
    cause = getattr(exc, "orig", None) or exc
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
    return first[:300]


def database_label(url: str | None = None) -> str:
    """The database's URL with its password hidden, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url or get_settings().db_url).render_as_string(hide_password=True)


def note_outage(exc: BaseException) -> None:
    """Log, once per outage in this process, that the database cannot be reached."""
    with _outage_lock:
        if _outage["since"] is not None:
            return
        _outage["since"] = time.monotonic()
    logger.warning("the database %s cannot be reached (%s): steps wait and retry until it answers; nothing is lost",
                   database_label(), describe_unavailable(exc))


def note_back() -> None:
    """Log, once, that the database answers again after an outage this process saw."""
    with _outage_lock:
        since, _outage["since"] = _outage["since"], None
    if since is not None:
        logger.warning("the database answers again, after %.0f s", time.monotonic() - since)


def log_failure(log: logging.Logger, what: str) -> None:
    """From an ``except`` block of a periodic sweep: an unreachable database is one line an outage (see
    :func:`note_outage`); anything else is logged with its traceback."""
    import sys

    exc = sys.exc_info()[1]
    if exc is not None and unavailable(exc):
        note_outage(exc)
        return
    log.exception(what)


def alembic_config(url: str | None = None) -> Any:
    from alembic.config import Config

    script_location = resources.files("migrations")
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("sqlalchemy.url", (url or get_settings().db_url).replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


_REVISION = re.compile(r"^(down_revision|revision)\s*=\s*['\"]([^'\"]+)['\"]", re.M)


def migration_head() -> str | None:
    """The newest migration's revision, read from the migration files' ``revision``/``down_revision`` lines without
    importing Alembic; None where they are not one chain so written (then Alembic itself decides)."""
    revisions, parents = set(), set()
    for path in resources.files("migrations").joinpath("versions").iterdir():
        if not path.name.endswith(".py") or path.name.startswith("__"):
            continue
        found = dict((key, value) for key, value in _REVISION.findall(path.read_text()))
        if "revision" not in found:
            return None
        revisions.add(found["revision"])
        parents.update([found["down_revision"]] if "down_revision" in found else [])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def schema_is_current(url: str | None = None) -> bool:
    """True when the database is at the newest migration. A database that records exactly the head the migration
    files name is current without Alembic (its import and the parse of every migration: a fifth of a second of each
    `segq submit`, on the way to a waited-for volume's prepare); any other answer is Alembic's."""
    head = migration_head()
    if head is not None and _recorded_revisions(url) == {head}:
        return True
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    with get_engine(url).connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads


def _recorded_revisions(url: str | None) -> set[str]:
    """What the database's ``alembic_version`` table holds; empty when it has none yet."""
    try:
        with get_engine(url).connect() as conn:
            return {str(v) for v in conn.execute(text("SELECT version_num FROM alembic_version")).scalars()}
    except sa_exc.SQLAlchemyError:
        return set()


def ensure_schema(url: str | None = None) -> None:
    """Bring an embedded SQLite database up to date; ask for ``segq db upgrade`` elsewhere.

    Several processes may start at once on one fresh file (a launcher's children, two `segq worker`): the check
    and the migration run under a lock file beside the database, so one creates the tables and the others find
    them (they crashed with "table datasets already exists"). On PostgreSQL an advisory lock does the same.
    """
    url = url or get_settings().db_url
    with _schema_lock(url):
        _ensure_schema(url)


@contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    if url.startswith("postgresql"):
        with get_engine(url).connect() as conn:  # a session-level advisory lock, held on this connection
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
        return
    path = _sqlite_path(url)
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".schema-lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _ensure_schema(url: str) -> None:
    if schema_is_current(url):
        return
    if url.startswith("sqlite") or not inspect(get_engine(url)).get_table_names():
        upgrade(url)
        return
    raise RuntimeError(f"the database at {get_engine(url).url!r} is behind this version of segq: run `segq db upgrade`")
