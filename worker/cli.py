"""``segq worker``: Celery workers for this machine.

Without ``--gpus`` (or ``--role``) it is one plain Celery worker serving the coordinator and gpu queues.
With ``--gpus`` it is the launcher (worker/launcher.py): one worker process per GPU, or N CPU workers
with ``--gpus none``, plus one coordinator process, restarted when they die.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import click
from celery.utils.nodenames import default_nodename, host_format

from segq.names import every_queue

logger = logging.getLogger("segq.worker")

ROLE_HELP = ("With --gpus: 'all' runs the GPU (or CPU) workers and a coordinator process; 'gpu' only the former; "
             "'coordinator' only the latter (then --gpus is not needed).")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-n", "--hostname", default=None,
              help="Node name, as Celery's -n (e.g. cpu1@%h). With --gpus: HOST names the machine part "
                   "(gpu0@HOST, coord@HOST) and NAME@HOST gives gpu0-NAME@HOST.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes; with --gpus none, the number of CPU workers.")
@click.option("-Q", "--queues", default=None,
              help="Comma-separated queues (default: coordinator and gpu, all priorities). Not with --gpus.")
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.option("--gpus", default=None, metavar="SPEC",
              help="One worker process per GPU: all | N | 0,2 | none (CPU workers, see --concurrency).")
@click.option("--role", type=click.Choice(["all", "gpu", "coordinator"]), default=None, help=ROLE_HELP)
@click.option("--coordinator-concurrency", type=click.IntRange(min=1), default=None,
              help="With --gpus: processes of the coordinator worker (load, preprocess, merge, write); "
                   "default 4 a GPU worker, within the cores the GPU workers leave, at least 2.")
@click.option("-P", "--pool", type=click.Choice(["prefork", "threads", "solo"]), default="prefork", show_default=True,
              help="Pool of a plain worker, as Celery's -P. With --gpus, GPU workers use threads and the "
                   "coordinator prefork.")
@click.option("--max-idle", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Leave (exit 0) once no task has come for this many seconds, for autoscalers; with --gpus, each "
                   "worker process leaves on its own and the launcher does not restart it (default: "
                   "SEGQ_MAX_IDLE, else never).")
@click.pass_context
def worker(ctx: click.Context, hostname: str | None, concurrency: int, queues: str | None, loglevel: str,
           gpus: str | None, role: str | None, coordinator_concurrency: int | None, pool: str,
           max_idle: float | None) -> None:
    """Start Celery workers; any further options are passed to every `celery worker`."""
    from segq.db import ensure_schema

    refuse_bad_credentials()
    if gpus is not None or role is not None:
        ensure_schema()  # once here, so a database problem is one clear error rather than N crashing children
        sys.exit(launch(ctx, hostname, concurrency, queues, loglevel, gpus, role or "all", coordinator_concurrency,
                        max_idle))

    from segq.broker import warn_if_unsafe
    from segq.celery_app import get_app
    from segq.db import get_engine
    from segq.errors import EngineError
    from segq.names import EXIT_CONFIG
    from segq.settings import get_settings
    from segq.watchdog import IncarnationStep, SchedulerStep, WatchdogStep
    from worker.leaving import IdleStep
    from worker.preflight import preflight

    ensure_schema()
    # Finish before you start: merges, then GPU parts, then new volumes.
    queue_list = queues or ",".join(every_queue())
    try:
        preflight(get_settings(), queue_list)  # a backend that cannot load fails the start, not every task
    except EngineError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    warn_if_unsafe(get_settings().broker_url)  # loudly, if a Redis restart or eviction would lose queued work
    if get_settings().omp_num_threads is None:  # share the cores with the other workers here, as the launcher does
        from worker import threads

        threads.register(concurrency)
    node = host_format(default_nodename(hostname or "segq@%h"))
    if (unshared := storage_problem(get_settings(), node)) is not None:  # it would fail every part it took
        click.echo(f"Error: {unshared}", err=True)
        sys.exit(EXIT_CONFIG)
    join(node, queue_list, pool)
    get_engine().dispose()  # the pool processes fork from this one: they must not share its database connection
    argv = ["worker", "-Q", queue_list, "-c", str(concurrency), "-l", loglevel, "-n", node, "--pool", pool, *ctx.args]
    app = get_app()
    app.conf.segq_max_idle = get_settings().max_idle if max_idle is None else max_idle
    begin_incarnation(app, node)  # before the pool forks: every process of the worker shares it
    app.steps["worker"].add(IncarnationStep)  # takes back what an earlier start under this name left running
    app.steps["worker"].add(WatchdogStep)  # fails jobs stuck past SEGQ_JOB_DEADLINE (off with interval 0)
    app.steps["worker"].add(SchedulerStep)  # GPU heartbeat and admission of waiting volumes
    app.steps["worker"].add(IdleStep)  # --max-idle: leave once idle (worker/leaving.py)
    app.worker_main(argv)
    from worker.steps import stop_code

    sys.exit(stop_code())  # 78 when the worker stopped itself (segq_stop): the launcher does not restart it


def begin_incarnation(app: Any, hostname: str) -> str | None:
    """Make this start's token (segq/incarnation.py), unless a live worker already answers to the same name.

    Two live workers under one name (two plain `segq worker` on one machine, both ``segq@host``) cannot be told
    apart from a restart by the name; with tokens, each would take the other's parts back. The later one then
    records no token and takes nothing back, and says how to fix it."""
    from celery.utils.nodenames import host_format

    from segq.incarnation import begin

    name = host_format(hostname)
    try:
        # On a connection of its own: a ping through the app's pools before the pool forks left every pool process
        # forked later (one replacing a killed one) hanging before its UP message.
        with app.connection_for_write() as connection:
            replies = app.control.ping(destination=[name], timeout=1.0, connection=connection) or []
        taken = any(name in reply for reply in replies)
    except Exception:  # the broker is not there yet: Celery retries the connection; nobody else answers either
        taken = False
    if taken:
        logger.warning("another worker is running under the name %s: give each worker its own name (-n NAME@%%h); "
                       "until then this one cannot take back what a killed start of that name left running", name)
        return None
    return begin()


def refuse_bad_credentials() -> None:
    """Exit with EX_CONFIG (78) and one line when the broker refuses our password: the launcher does not restart
    such a worker (and exits so itself), since every new process would be refused the same way."""
    from segq.broker import check_credentials
    from segq.errors import ConfigError
    from segq.names import EXIT_CONFIG
    from segq.settings import get_settings

    settings = get_settings()
    try:
        for url in dict.fromkeys((settings.broker_url, settings.backend_url)):
            check_credentials(url)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def storage_problem(settings: Any, node: str) -> str | None:
    """Why this worker's SEGQ_STORAGE is not the one the other workers share (segq.sharedstorage); the first worker
    to start registers its own. None when it is, or when Redis cannot be asked (the worker's own start says why)."""
    import redis

    from segq import sharedstorage

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=5)
        return sharedstorage.problem(client, settings.storage_root, node, start=True)
    except (redis.RedisError, OSError) as exc:
        logger.warning("could not check that SEGQ_STORAGE is the shared one: %s", exc)
        return None


def join(name: str, queues: str, pool: str) -> None:
    """A GPU worker builds the engines of the datasets running now before Celery starts consuming.

    Only a threads or solo pool runs its tasks in this process (as the launcher's GPU workers do); a prefork
    pool's children build their own, and this process must stay free of CUDA before it forks them.
    """
    from segq.errors import EngineError, EngineRefusedError
    from segq.names import EXIT_CONFIG, EXIT_ENGINE_BROKEN
    from segq.settings import get_settings
    from worker.preflight import serves_gpu_queue

    settings = get_settings()
    if pool == "prefork" or settings.backend == "simulate" or not serves_gpu_queue(queues):
        return
    from worker.runtime import warm_up

    started = time.perf_counter()
    try:
        built = warm_up(settings, name)
    except EngineError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_CONFIG if isinstance(exc, EngineRefusedError) else EXIT_ENGINE_BROKEN)
    if built:
        logger.info("%s: %d engine(s) ready in %.1f s; joining: taking GPU work now", name, built,
                    time.perf_counter() - started)


def launch(ctx: click.Context, hostname: str | None, concurrency: int, queues: str | None, loglevel: str,
           gpus: str | None, role: str, coordinator_concurrency: int | None, max_idle: float | None = None) -> int:
    """Run the per-GPU launcher; returns its exit code. Never imports torch or touches CUDA."""
    from segq.deadworkers import hand_back_quietly
    from segq.settings import child_environment, get_settings
    from worker.launcher import Launcher, count_gpus, parse_gpus, plan_children, visible_devices

    if queues:
        raise click.UsageError("-Q does not go with --gpus/--role: GPU workers consume the gpu queues and the "
                               "coordinator the coordinator queues")
    if role != "coordinator" and gpus is None:
        raise click.UsageError(f"--role {role} needs --gpus (all | N | 0,2 | none)")
    selected = None
    if role != "coordinator" and gpus is not None and gpus.strip().lower() != "none":
        try:
            selected = parse_gpus(gpus, visible_devices(get_settings().cuda_visible_devices, count_gpus))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gpus") from exc
        if concurrency != 1:
            raise click.UsageError("--concurrency sets the number of CPU workers of --gpus none; a GPU worker "
                                   "runs one task at a time")
    idle = {} if max_idle is None else {"SEGQ_MAX_IDLE": str(max_idle)}  # each child leaves on its own
    specs = plan_children(selected, cpu_workers=concurrency, role=role, hostname=hostname,
                          coordinator_concurrency=coordinator_concurrency, loglevel=loglevel, extra=ctx.args,
                          base_env=child_environment(**idle), prefetch=get_settings().gpu_prefetch)
    for spec in specs:
        logger.info("%s consumes %s", spec.name, spec.argv[spec.argv.index("-Q") + 1])
    return Launcher(specs, on_death=hand_back_quietly).run()
