"""Database engine and sessions; SQLite gets WAL and a busy timeout so several workers can write."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

from segq.settings import get_settings

logger = logging.getLogger("segq.db")

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


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
    """A session that commits on success and rolls back on any error."""
    session = _sessionmaker(url or get_settings().db_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


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


def schema_is_current(url: str | None = None) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    with get_engine(url).connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads


def ensure_schema(url: str | None = None) -> None:
    """Bring an embedded SQLite database up to date; ask for ``segq db upgrade`` elsewhere."""
    url = url or get_settings().db_url
    if schema_is_current(url):
        return
    if url.startswith("sqlite") or not inspect(get_engine(url)).get_table_names():
        upgrade(url)
        return
    raise RuntimeError(f"the database at {get_engine(url).url!r} is behind this version of segq: run `segq db upgrade`")
