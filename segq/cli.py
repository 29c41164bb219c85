"""The ``segq`` command. Sub-commands load lazily, so ``segq submit`` never imports torch."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from segq.errors import SegqError

# name -> "module:attribute"; each module imports only what its commands need.
COMMANDS = {
    "submit": "producer.cli:submit",
    "status": "producer.cli:status",
    "results": "producer.cli:results",
    "watch": "producer.cli:watch",
    "resume": "producer.cli:resume",
    "retry": "producer.cli:retry",
    "cancel": "producer.cli:cancel",
    "watchdog": "segq.watchdog:watchdog",
    "report": "producer.cli:report",
    "metrics": "segq.metrics_http:metrics",
    "worker": "worker.cli:worker",
    "export-onnx": "worker.enginecli:export_onnx",
    "build-engine": "worker.enginecli:build_engine",
    "warm-engine": "worker.enginecli:warm_engine",
    "db": "segq.dbcli:db",
    "demo-data": "producer.democli:demo_data",
    "train-demo": "producer.democli:train_demo",
    "evaluate": "producer.democli:evaluate",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attribute = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SegqError as exc:
            raise click.ClickException(str(exc)) from exc
        except Exception as exc:
            friendly = _database_unreachable(exc)
            if friendly is None:
                raise
            raise friendly from None


def _database_unreachable(exc: Exception) -> click.ClickException | None:
    """One line for a database that cannot be reached (SQLAlchemy's own report runs to kilobytes), else None."""
    if "sqlalchemy" not in sys.modules:
        return None
    from segq import db

    if not db.unavailable(exc):
        return None
    return click.ClickException(f"cannot reach the database {db.database_label()}: {db.describe_unavailable(exc)}; "
                                "start it, or point SEGQ_DATABASE_URL at the right one")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
@click.version_option(package_name="segq")
def cli(verbose: bool) -> None:
    """Queue 3D volume segmentation (MONAI sliding windows) across GPU workers."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)
    from segq import faults

    faults.point("at_start")  # TEST ONLY: a skewed clock must be in place before anything reads it


def main() -> None:
    cli(prog_name="segq")


if __name__ == "__main__":
    main()
