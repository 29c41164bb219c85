"""Every name segq shares between processes: tasks, queues, priorities, Redis keys, task ids, exit codes.

Producers send tasks by name, so nothing here imports Celery or the worker's torch stack.
"""

from __future__ import annotations

# Tasks, one per step of a job.
PREPARE = "segq.segment_volume"  # load, check, preprocess, plan, then send the GPU parts
INFER = "segq.infer_slab"  # one part (slab) of a volume's windows on a GPU
MERGE = "segq.merge"  # add the parts, threshold, write the mask, close the job
JOB_FAILED = "segq.job_failed"  # error callback of a job's chord
RECORD_FAILURE = "segq.record_failure"  # the callback's work as a message of its own, when the database was away

# Queues. A worker polls them in the order of ``consumed_queues``: finishing work comes first.
FINISH_QUEUE = "finish"  # merges: they complete volumes and free look-ahead slots
GPU_QUEUE = "gpu"
PREPARE_QUEUE = "coordinator"  # volume preparation: only as many as the look-ahead admits
PRIORITIES = ("high", "normal", "low")

REDIS_KEY_PREFIX = "segq:"
DELIVERIES_KEY = REDIS_KEY_PREFIX + "deliveries:{task_id}:{retries}"  # one count per delivery of a message
GPU_WORKERS_KEY = REDIS_KEY_PREFIX + "gpu-workers"  # sorted set: GPU worker name -> last heartbeat (unix time)
ENGINE_LOADING_KEY = REDIS_KEY_PREFIX + "engine-loading"  # hash: worker -> JSON {what, since} while it builds one
INCARNATIONS_KEY = REDIS_KEY_PREFIX + "incarnations"  # hash: worker name -> token of its latest start
STORAGE_KEY = REDIS_KEY_PREFIX + "storage"  # JSON {id, path, worker}: the shared storage's marker (segq.sharedstorage)

TASK_ID_PREFIX = "segq"

# Process exit codes (sysexits.h): the launcher restarts the first and gives up the second at once.
EXIT_ENGINE_BROKEN = 70  # EX_SOFTWARE: the device context is unusable; a fresh process takes over
EXIT_CONFIG = 78  # EX_CONFIG: the engine cannot load as configured; restarting cannot help


def queue_for(base: str, priority: str = "normal") -> str:
    """``gpu`` / ``coordinator`` / ``finish`` for normal work, ``gpu.high`` / ``gpu.low`` for the other priorities."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return base if priority == "normal" else f"{base}.{priority}"


def consumed_queues(*bases: str) -> list[str]:
    """Every priority variant of ``bases``: base by base in the order given, highest priority first.

    Kombu polls a worker's queues in this order, so ``consumed_queues(FINISH_QUEUE, PREPARE_QUEUE)``
    merges every waiting volume before it prepares another.
    """
    return [queue_for(base, p) for base in bases for p in PRIORITIES]


def every_queue() -> list[str]:
    """All of segq's queues, in the order a plain ``segq worker`` polls them (merges first)."""
    return consumed_queues(FINISH_QUEUE, GPU_QUEUE, PREPARE_QUEUE)


def attempt_task_prefix(job_id: str, attempt: int) -> str:
    """What every task id of one attempt of a job starts with (its volume, slabs and merge)."""
    return f"{TASK_ID_PREFIX}-{job_id}-a{attempt}-"


def volume_task_id(job_id: str, attempt: int) -> str:
    return f"{TASK_ID_PREFIX}-{job_id}-a{attempt}-volume"


def slab_task_id(job_id: str, attempt: int, slab: int) -> str:
    return f"{TASK_ID_PREFIX}-{job_id}-a{attempt}-slab{slab}"


def merge_task_id(job_id: str, attempt: int) -> str:
    return f"{TASK_ID_PREFIX}-{job_id}-a{attempt}-merge"


def revocable_task_ids(job_id: str, attempt: int, subtasks: int | None) -> list[str]:
    """The ids to revoke when a job is cancelled: its volume task and every slab of the attempt.

    The merge (and the chord's error callback) is left to run: it is the step that deletes the
    workspace of a job that ended, so revoking it would leave files behind.
    """
    return [volume_task_id(job_id, attempt), *(slab_task_id(job_id, attempt, k) for k in range(subtasks or 0))]
