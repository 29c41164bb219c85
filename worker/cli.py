"""``segq worker``: a Celery worker serving the coordinator and gpu queues on this machine."""

from __future__ import annotations

import click

from segq.celery_app import COORDINATOR_QUEUE, GPU_QUEUE, consumed_queues


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-n", "--hostname", default=None, help="Node name, as Celery's -n (e.g. cpu1@%h).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes.")
@click.option("-Q", "--queues", default=None,
              help="Comma-separated queues (default: coordinator and gpu, all priorities).")
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.pass_context
def worker(ctx: click.Context, hostname: str | None, concurrency: int, queues: str | None, loglevel: str) -> None:
    """Start a Celery worker; any further options are passed to `celery worker`."""
    from segq.celery_app import get_app
    from segq.db import ensure_schema

    ensure_schema()
    queue_list = queues or ",".join(consumed_queues(GPU_QUEUE, COORDINATOR_QUEUE))
    argv = ["worker", "-Q", queue_list, "-c", str(concurrency), "-l", loglevel,
            "-n", hostname or "segq@%h", "--pool", "prefork", *ctx.args]
    get_app().worker_main(argv)
