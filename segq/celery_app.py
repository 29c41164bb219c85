"""The Celery app: routes and the reliability settings every worker shares (names live in segq.names)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

from segq.names import FINISH_QUEUE, GPU_QUEUE, INFER, MERGE, PREPARE, PREPARE_QUEUE
from segq.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("segq", broker=settings.broker_url, backend=settings.backend_url, include=["worker.tasks"])
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # Kombu polls a worker's queues in the order listed (segq.names.consumed_queues): finishing work first.
        "queue_order_strategy": "priority",
        # A message whose worker died whole waits in the unacked hash until a worker's sweep restores it.
        # Kombu sweeps every 10 s x 10 (100 s past the timeout); sweep every 1/20 of the timeout instead.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 20)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        # 30 s of grace before the hard kill, but never more than a quarter of the limit: a short limit
        # must not turn into a soft limit of a few seconds that fails every task still importing torch.
        task_soft_time_limit=max(settings.task_time_limit - 30, settings.task_time_limit * 3 // 4),
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        result_expires=settings.result_expires,
        result_extended=True,
        task_default_queue=PREPARE_QUEUE,
        task_routes={PREPARE: {"queue": PREPARE_QUEUE}, MERGE: {"queue": FINISH_QUEUE}, INFER: {"queue": GPU_QUEUE}},
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Retry result-backend writes through a Redis restart. Without it, cancelling a running task on the
        # connection loss fails to record the cancel, Celery then records it as revoked, acknowledges the
        # message and fails the job's chord: the job is lost to a restart (docs/RELIABILITY.md, scenario 8).
        result_backend_always_retry=True,
        result_backend_max_retries=30,  # ~2 min of jittered backoff (at most 10 s apart), then the error shows
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_annotations={"*": {"max_retries": settings.max_retries}},
    )
    return app


@worker_init.connect
def _guard_the_consumer(**_kwargs: Any) -> None:
    from segq.broker import guard_undecodable_messages, unacked_on_shared_clock

    guard_undecodable_messages()
    unacked_on_shared_clock()


@worker_process_init.connect
def _forget_inherited_connections(**_kwargs: Any) -> None:
    """A pool process is forked from the worker's main process, which may hold database connections (a
    chord's error callback runs there when a pool process dies): drop the inherited ones without closing
    them, so parent and child never talk over one socket (SQLAlchemy's advice for forked processes)."""
    from segq.db import get_engine

    for url in (None, get_settings().db_url):
        get_engine(url).dispose(close=False)


@lru_cache(maxsize=1)
def get_app() -> Celery:
    return create_app(get_settings())


app = get_app()
