"""Celery task ids derived from (job, attempt, part), so a canceller can revoke a job's tasks without storing them.

Every message of one attempt has a known id; a new attempt (resume, retry) gets new ids, so revoking
an old attempt never touches the new one. Celery keeps the id across a task's own retries.
"""

from __future__ import annotations

PREFIX = "segq"


def volume_task_id(job_id: str, attempt: int) -> str:
    return f"{PREFIX}-{job_id}-a{attempt}-volume"


def slab_task_id(job_id: str, attempt: int, slab: int) -> str:
    return f"{PREFIX}-{job_id}-a{attempt}-slab{slab}"


def merge_task_id(job_id: str, attempt: int) -> str:
    return f"{PREFIX}-{job_id}-a{attempt}-merge"


def revocable_task_ids(job_id: str, attempt: int, subtasks: int | None) -> list[str]:
    """The ids to revoke when a job is cancelled: its volume task and every slab of the attempt.

    The merge (and the chord's error callback) is left to run: it is the step that deletes the
    workspace of a job that ended, so revoking it would leave files behind.
    """
    return [volume_task_id(job_id, attempt), *(slab_task_id(job_id, attempt, k) for k in range(subtasks or 0))]
