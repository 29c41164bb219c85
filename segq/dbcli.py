"""``segq db upgrade``: apply the Alembic migrations to SEGQ_DATABASE_URL."""

from __future__ import annotations

import click


@click.group()
def db() -> None:
    """Database schema commands."""


@db.command()
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
def upgrade(revision: str) -> None:
    """Apply the Alembic migrations (safe to repeat)."""
    from segq.db import get_engine
    from segq.db import upgrade as run_upgrade

    run_upgrade(revision=revision)
    click.echo(f"database {get_engine().url!r} is at {revision}")
