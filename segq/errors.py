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


class StorageNotSharedError(InputError):
    """A worker cannot see a job's workspace: its SEGQ_STORAGE is not the shared one."""


class DiskFullError(InputError):
    """The output or storage disk is full or read-only: fail the job saying so; `segq retry --failed` after."""


class CancelledError(SegqError):
    """The job was cancelled while this task ran."""
