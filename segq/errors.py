"""Errors split by what the system should do about them."""

from __future__ import annotations


class SegqError(Exception):
    """Base of every error segq raises on purpose."""


class InputError(SegqError):
    """Bad input: fail this one job with the message, never retry."""


class TransientError(SegqError):
    """A passing fault (broker, storage hiccup, out of memory): retry with a bound."""


class EngineError(SegqError):
    """The inference engine cannot run (missing backend, broken CUDA context): stop the worker."""


class EngineRefusedError(EngineError):
    """The engine loads but fails the accuracy gate: a fresh process would build the same one, so the worker
    exits with EX_CONFIG (78) and the launcher does not restart it; its message waits for another worker."""

    HINT = "Run in fp32 or with SEGQ_TORCH_COMPILE=off, or check the ONNX export"


class StorageNotSharedError(InputError):
    """A worker cannot see a job's workspace: its SEGQ_STORAGE is not the shared one."""


class DiskFullError(InputError):
    """The output or storage disk is full or read-only: fail the job saying so; `segq retry --failed` after."""


class ConfigError(SegqError):
    """The deployment is set up wrong (the broker refuses the password): a worker exits with EX_CONFIG (78), which
    the launcher does not restart, since a new process would meet the same refusal."""


class WorkerLeaving(SegqError):
    """This worker is leaving (SIGTERM) and the step would not end within SEGQ_STOP_GRACE: its message goes back
    to the queue for another worker, and nothing it computed is kept."""


class CancelledError(SegqError):
    """The job was cancelled while this task ran."""


class StreamStalledError(TransientError):
    """A GPU part waited for rows of its streamed input that stopped arriving (the worker preparing the volume
    died or stalled): retried, by when the prepare delivered again resumes the stream."""
