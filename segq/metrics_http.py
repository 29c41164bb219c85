"""``segq metrics``: a Prometheus endpoint computed from the database (and the broker's queue lengths).

Why from the database: it is the record of truth every worker writes to, so one small process anywhere
that reaches it sees the whole fleet, and no worker (a prefork pool, one process per GPU) has to host
a server. Each scrape runs a handful of aggregate queries; scrape every 15 s or slower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click
from sqlalchemy import func, select

from segq.db import ensure_schema, session_scope
from segq.models import Dataset, Job, Status, Subtask, utcnow
from segq.names import GPU_WORKERS_KEY, every_queue
from segq.scheduler import IN_FLIGHT, live_after
from segq.settings import get_settings

logger = logging.getLogger("segq.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Sample = tuple[dict[str, str], float]
GPU_WINDOW_SECONDS = 15 * 60


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """Whole numbers exactly (byte counts past 2**24 too), others as Python's shortest round-trip repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> str:
    """One metric family in the Prometheus text exposition format."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        number = _number(value)
        lines.append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")
    return "\n".join(lines) + "\n"


def _timestamp(value: datetime | None) -> float:
    if value is None:
        return 0.0
    return value.timestamp()  # aware: segq.models.UtcDateTime


def database_metrics() -> str:
    """Jobs and subtasks by status, windows processed, seconds per phase, and per-worker figures."""
    with session_scope() as s:
        jobs = {row[0]: int(row[1]) for row in s.execute(select(Job.status, func.count()).group_by(Job.status))}
        by_status = select(Subtask.status, func.count()).group_by(Subtask.status)
        parts = {row[0]: int(row[1]) for row in s.execute(by_status)}
        datasets = s.scalar(select(func.count()).select_from(Dataset)) or 0
        windows = s.scalar(select(func.sum(Subtask.windows)).where(Subtask.status == Status.DONE)) or 0
        phases = s.execute(select(func.sum(Job.preprocess_seconds), func.sum(Job.inference_seconds),
                                  func.sum(Job.merge_seconds), func.count())
                           .where(Job.status == Status.DONE)).one()
        per_worker = s.execute(select(Subtask.worker, func.count(), func.sum(Subtask.windows),
                                      func.sum(Subtask.seconds), func.max(Subtask.finished_at))
                               .where(Subtask.status == Status.DONE, Subtask.worker.is_not(None))
                               .group_by(Subtask.worker)).all()
        recent = utcnow() - timedelta(seconds=GPU_WINDOW_SECONDS)
        gpu = s.execute(select(Subtask.worker, func.max(Subtask.gpu_peak_bytes))
                        .where(Subtask.gpu_peak_bytes.is_not(None), Subtask.worker.is_not(None),
                               Subtask.finished_at >= recent).group_by(Subtask.worker)).all()
    workers = [(str(w), int(n), float(win or 0), float(sec or 0.0), _timestamp(last))
               for w, n, win, sec, last in per_worker]
    return "".join([
        family("segq_datasets", "gauge", "Datasets recorded.", [({}, datasets)]),
        family("segq_jobs", "gauge", "Jobs (volumes) by status.",
               [({"status": st.value}, float(jobs.get(st, 0))) for st in Status]),
        family("segq_subtasks", "gauge", "Subtask rows (slabs) by status, all attempts.",
               [({"status": st.value}, float(parts.get(st, 0))) for st in Status]),
        family("segq_windows_processed_total", "counter", "Sliding windows run by done subtasks.",
               [({}, float(windows))]),
        family("segq_phase_seconds_total", "counter",
               "Seconds spent per phase by done jobs (inference: the sum of their subtasks).",
               [({"phase": "preprocess"}, float(phases[0] or 0)), ({"phase": "inference"}, float(phases[1] or 0)),
                ({"phase": "merge"}, float(phases[2] or 0))]),
        family("segq_worker_subtasks_total", "counter", "Done subtasks per worker.",
               [({"worker": w}, n) for w, n, _, _, _ in workers]),
        family("segq_worker_windows_total", "counter", "Windows run per worker.",
               [({"worker": w}, win) for w, _, win, _, _ in workers]),
        family("segq_worker_busy_seconds_total", "counter", "Seconds per worker spent running subtasks.",
               [({"worker": w}, sec) for w, _, _, sec, _ in workers]),
        family("segq_worker_last_subtask_timestamp_seconds", "gauge",
               "When the worker last finished a subtask (Unix time).",
               [({"worker": w}, last) for w, _, _, _, last in workers]),
        family("segq_worker_gpu_peak_bytes", "gauge",
               f"Most GPU memory a subtask held on the worker, over the last {GPU_WINDOW_SECONDS // 60} minutes.",
               [({"worker": str(w)}, float(peak or 0)) for w, peak in gpu]),
    ])


def backlog_metrics() -> str:
    """The work waiting, for an autoscaler: volumes waiting for room, volumes admitted and not finished, and the
    windows of GPU parts no GPU has started (docs/DEPLOY.md, Autoscaling)."""
    current = (Subtask.job_id == Job.id) & (Subtask.attempt == Job.attempt)
    with session_scope() as s:
        queued = s.scalar(select(func.count()).select_from(Job)
                          .where(Job.status == Status.QUEUED, Job.admitted_at.is_(None))) or 0
        admitted = s.scalar(select(func.count()).select_from(Job).where(IN_FLIGHT)) or 0
        parts, windows = s.execute(select(func.count(), func.sum(Subtask.windows)).join(Job, current)
                                   .where(Job.status == Status.RUNNING, Subtask.status == Status.QUEUED)).one()
    return "".join([
        family("segq_volumes_queued", "gauge", "Volumes waiting in the database for room to be prepared.",
               [({}, float(queued))]),
        family("segq_volumes_admitted", "gauge",
               "Volumes admitted and not finished: preparing, waiting for a GPU, on a GPU or merging.",
               [({}, float(admitted))]),
        family("segq_gpu_parts_queued", "gauge", "GPU parts of running volumes that no GPU worker has started.",
               [({}, float(parts or 0))]),
        family("segq_gpu_windows_queued", "gauge", "Sliding windows in those parts: the GPU work waiting.",
               [({}, float(windows or 0))]),
    ])


def broker_metrics() -> str:
    """Messages waiting per queue and the GPU workers beating now (Redis brokers only: a queue is a list)."""
    settings = get_settings()
    url = settings.broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return ""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        queues = every_queue()
        lengths = [({"queue": q}, float(client.llen(q))) for q in queues]
        gpus = float(client.zcount(GPU_WORKERS_KEY, f"({live_after(settings, client)}", "+inf"))
    finally:
        client.close()
    return "".join([
        family("segq_queue_messages", "gauge", "Messages waiting in each broker queue.", lengths),
        family("segq_gpu_workers", "gauge", "GPU workers with an engine ready that beat recently (as admission "
               "counts them; a simulated worker counts as its SEGQ_SIMULATE_DEVICES).", [({}, gpus)]),
    ])


def exposition() -> str:
    """Everything, with segq_up{source} saying which part could be read this time."""
    started = time.perf_counter()
    text, up = [], []
    for source, collect in (("database", database_metrics), ("backlog", backlog_metrics), ("broker", broker_metrics)):
        try:
            text.append(collect())
            up.append(({"source": source}, 1.0))
        except Exception as exc:  # a scrape must answer even when the database or broker is down
            logger.warning("metrics from the %s failed: %s", source, exc)
            up.append(({"source": source}, 0.0))
    text.append(family("segq_up", "gauge", "Whether the source answered this scrape.", up))
    text.append(family("segq_scrape_seconds", "gauge", "Seconds this scrape took.",
                       [({}, round(time.perf_counter() - started, 4))]))
    return "".join(text)


class MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served")
            return
        body = exposition().encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("%s " + format, self.address_string(), *args)


def serve(host: str, port: int) -> ThreadingHTTPServer:
    """A server bound to (host, port); call ``serve_forever`` on it (or ``shutdown`` from another thread)."""
    ensure_schema()
    server = ThreadingHTTPServer((host, port), MetricsHandler)
    server.daemon_threads = True
    return server


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=9808, show_default=True)
def metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics at http://HOST:PORT/metrics, computed from the database and broker."""
    server = serve(host, port)
    logger.info("serving Prometheus metrics on http://%s:%d/metrics", *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
