"""SQL records: datasets, jobs and their subtasks. The record of truth for every result."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from segq import clock


def utcnow() -> datetime:
    """Now on the broker's clock (segq/clock.py): every stored timestamp is compared across machines."""
    return clock.now()


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Status(enum.StrEnum):
    """A job's or subtask's state, stored as its value."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)



class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database: SQLite stores none and hands back naive values."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _status_column() -> Any:
    return Enum(Status, name="segq_status", native_enum=False, length=16,
                values_callable=lambda e: [m.value for m in e])


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON}


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    out_dir: Mapped[str] = mapped_column(Text)
    model_path: Mapped[str] = mapped_column(Text)
    model_sha256: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    jobs: Mapped[list[Job]] = relationship(back_populates="dataset", order_by="Job.input_path")


class Job(Base):
    """One input volume through one model with one set of parameters."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("dataset_id", "input_path", name="uq_jobs_dataset_input"),
                      Index("ix_jobs_status_admitted", "status", "admitted_at"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    input_path: Mapped[str] = mapped_column(Text)
    input_sha256: Mapped[str] = mapped_column(String(64), index=True)
    # content hash + model checksum + parameters: the identity that makes resubmission idempotent
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    output_path: Mapped[str] = mapped_column(Text)
    status: Mapped[Status] = mapped_column(_status_column(), default=Status.QUEUED, index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    spacing: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    tumour_voxels: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tumour_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    windows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    subtasks: Mapped[int | None] = mapped_column(Integer, nullable=True)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the scheduler let the job prepare (segq/scheduler.py); None while it waits in SQL for room.
    admitted_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    preprocess_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    inference_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    merge_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    workers: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    backend: Mapped[str | None] = mapped_column(String(32), nullable=True)
    precision: Mapped[str | None] = mapped_column(String(8), nullable=True)
    dice: Mapped[float | None] = mapped_column(Float, nullable=True)
    volume_error_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A DICOM series (NULL for NIfTI): which series, never which patient; its files, in no particular order
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    source_files: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    output_format: Mapped[str | None] = mapped_column(String(16), nullable=True)  # nifti, dicom-seg, both
    # A case of several files (nnU-Net's _0000.._000N, or a datalist): its channel files in channel order,
    # input_path being the first. NULL for a one-file case.
    channel_files: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Per label of the pipeline, once done: [{"value": 1, "name": "spleen", "voxels": n, "ml": v}, ...]
    labels: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)

    dataset: Mapped[Dataset] = relationship(back_populates="jobs")
    parts: Mapped[list[Subtask]] = relationship(back_populates="job", order_by="Subtask.slab")


class Subtask(Base):
    """One slab of one job's windows: the unit a GPU worker runs."""

    __tablename__ = "subtasks"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "slab", name="uq_subtasks_job_attempt_slab"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    slab: Mapped[int] = mapped_column(Integer)
    windows: Mapped[int] = mapped_column(Integer)
    status: Mapped[Status] = mapped_column(_status_column(), default=Status.QUEUED)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Which start of that worker runs it (segq/incarnation.py): a worker restarted under the same name is another
    # incarnation, and what the earlier one left running is taken back (segq/deadworkers.py). NULL: not known.
    incarnation: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # peak torch.cuda memory while the slab ran (None on CPU): how close a worker runs to out-of-memory
    gpu_peak_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    job: Mapped[Job] = relationship(back_populates="parts")


class Step(Base):
    """One run of one step of a job, on one worker: the timeline that `segq report` and the benchmarks read.

    ``busy_*`` is the part of the run that held the worker's device (the GPU lock): a GPU's busy fraction
    is the sum of those intervals over the span it worked.
    """

    __tablename__ = "steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[str] = mapped_column(String(16))
    part: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker: Mapped[str] = mapped_column(String(255), index=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime] = mapped_column(index=True)
    busy_started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    busy_finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    windows: Mapped[int | None] = mapped_column(Integer, nullable=True)
