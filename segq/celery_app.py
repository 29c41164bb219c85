"""The Celery app: queues, task names, routes and the reliability settings every worker shares.

Queue and task names live here alone; producers send tasks by name, so they never import the
worker's torch stack.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from segq.settings import Settings, get_settings

SEGMENT_VOLUME = "segq.segment_volume"
INFER_SLAB = "segq.infer_slab"
MERGE = "segq.merge"
JOB_FAILED = "segq.job_failed"

COORDINATOR_QUEUE = "coordinator"
GPU_QUEUE = "gpu"
PRIORITIES = ("high", "normal", "low")
REDIS_KEY_PREFIX = "segq:"


def queue_for(base: str, priority: str = "normal") -> str:
    """``gpu`` / ``coordinator`` for normal work, ``gpu.high`` / ``gpu.low`` for the other priorities."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return base if priority == "normal" else f"{base}.{priority}"


def consumed_queues(*bases: str) -> list[str]:
    """Every priority variant of ``bases``, highest first: the order a worker polls them in."""
    return [queue_for(base, p) for p in PRIORITIES for base in bases]


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("segq", broker=settings.broker_url, backend=settings.backend_url, include=["worker.tasks"])
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # Kombu polls the listed queues in order, so high-priority queues are drained first.
        "queue_order_strategy": "priority",
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
        task_soft_time_limit=max(settings.task_time_limit - 30, 5),
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        result_expires=settings.result_expires,
        result_extended=True,
        task_default_queue=COORDINATOR_QUEUE,
        task_routes={
            SEGMENT_VOLUME: {"queue": COORDINATOR_QUEUE},
            MERGE: {"queue": COORDINATOR_QUEUE},
            INFER_SLAB: {"queue": GPU_QUEUE},
        },
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_annotations={"*": {"max_retries": settings.max_retries}},
    )
    return app


@lru_cache(maxsize=1)
def get_app() -> Celery:
    return create_app(get_settings())


app = get_app()
