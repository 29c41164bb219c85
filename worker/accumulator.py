"""The merge's running sum, kept in the workspace: each part adds its partial as it finishes, so a merge only
adds what is still missing (normally nothing), thresholds and writes.

The sum (``sum.npy``, float32, the padded volume in NIfTI's order, as the partials are) changes only under an
exclusive lock on ``sum.lock`` (flock: the kernel releases it when its holder dies). A journal (``sum.json``,
replaced atomically) records which partials are in the sum, and which one is being added. An add is not idempotent
by itself, so:

- a partial whose slab the journal lists is never added again (a redelivered part, or the merge's own check);
- a journal still naming a slab as being added means its adder died half-way: the next holder of the lock
  rebuilds the sum from zero out of the partial files the journal lists (they stay in the workspace until the
  job is done), then goes on. Nothing is lost and nothing is counted twice, whichever process dies where.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segq import faults, storage
from segq.errors import InputError
from worker.streaming import create_input

logger = logging.getLogger("segq.accumulator")

SUM, JOURNAL, LOCK = "sum.npy", "sum.json", "sum.lock"
_FLOAT = np.dtype(np.float32)


@dataclass(frozen=True)
class Part:
    """A finished part's partial: its slab, first row, the checksum its subtask reported and its file's name."""

    index: int
    lo: int
    checksum: str
    file: str


@dataclass
class Journal:
    added: dict[int, Part] = field(default_factory=dict)
    adding: int | None = None  # a slab whose add began and did not finish

    def to_json(self) -> dict[str, object]:
        return {"added": [vars(p) for p in self.added.values()], "adding": self.adding}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Journal:
        parts = [Part(**p) for p in data["added"]]  # type: ignore[attr-defined]
        adding = data.get("adding")
        return cls({p.index: p for p in parts}, None if adding is None else int(adding))  # type: ignore[call-overload]


@contextlib.contextmanager
def _locked(ws: Path) -> Iterator[None]:
    fd = os.open(ws / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read(ws: Path) -> Journal | None:
    try:
        return Journal.from_json(json.loads((ws / JOURNAL).read_text()))
    except FileNotFoundError:
        return None


def _save(ws: Path, journal: Journal) -> None:
    with storage.atomic_path(ws / JOURNAL, durable=False) as tmp:
        tmp.write_text(json.dumps(journal.to_json()))


def add(ws: Path, shape: tuple[int, ...], part: Part) -> None:
    """Add ``part``'s partial into the workspace's sum of ``shape`` once, whoever asks and however often."""
    with _locked(ws):
        journal = _recovered(ws, shape)
        _add_missing(ws, shape, journal, [part])


def total(ws: Path, shape: tuple[int, ...], parts: Sequence[Part]) -> np.ndarray:
    """The sum of every one of ``parts``, adding those not in it yet (a part's add that never ran), memory-mapped."""
    with _locked(ws):
        journal = _recovered(ws, shape)
        _add_missing(ws, shape, journal, parts)
        return storage.load_array(ws / SUM, mmap=True).T  # read once, by the threshold: no copy first


def _add_missing(ws: Path, shape: tuple[int, ...], journal: Journal, parts: Sequence[Part]) -> None:
    for part in parts:
        known = journal.added.get(part.index)
        if known is None:
            _add_one(ws, shape, journal, part)
        elif known.checksum != part.checksum:
            raise InputError(f"slab {part.index}'s partial in {ws} was added to the sum with checksum "
                             f"{known.checksum}, but its subtask reported {part.checksum}: run the job again "
                             "(`segq retry`)")


def _recovered(ws: Path, shape: tuple[int, ...]) -> Journal:
    """The journal, the sum made consistent with it first: created empty, or rebuilt after an add that died."""
    journal = _read(ws)
    if journal is None:
        _fresh_sum(ws, shape)
        journal = Journal()
        _save(ws, journal)
    elif journal.adding is not None or not (ws / SUM).is_file():
        logger.warning("the running sum in %s was left half-added (slab %s): rebuilding it from %d partial(s)", ws,
                       journal.adding, len(journal.added))
        _fresh_sum(ws, shape)
        rebuilt = Journal()
        for part in sorted(journal.added.values(), key=lambda p: p.index):
            _add_one(ws, shape, rebuilt, part)
        journal = rebuilt
    return journal


def _fresh_sum(ws: Path, shape: tuple[int, ...]) -> None:
    (ws / SUM).unlink(missing_ok=True)
    create_input(ws / SUM, tuple(reversed(shape)), _FLOAT)  # NIfTI's order: (Z, Y, X) on disk


def _add_one(ws: Path, shape: tuple[int, ...], journal: Journal, part: Part) -> None:
    array = storage.load_array(ws / part.file, mmap=True)
    if storage.array_checksum(array) != part.checksum:
        raise InputError(f"slab {part.index}'s partial in {ws} does not match the checksum its subtask reported")
    journal.adding = part.index
    _save(ws, journal)
    half = array.shape[0] // 2
    flush = storage.on_network_filesystem(ws / SUM)
    _add_rows(ws / SUM, shape, part.lo, array[:half], flush)
    faults.point("in_add_partial", slab=part.index)
    _add_rows(ws / SUM, shape, part.lo + half, array[half:], flush)
    journal.added[part.index] = part
    journal.adding = None
    _save(ws, journal)


def _add_rows(path: Path, shape: tuple[int, ...], lo: int, rows: np.ndarray, flush: bool) -> None:
    """Rows ``[lo, lo + len(rows))`` of the sum += ``rows``, through the file's memory map; with ``flush`` (a network
    filesystem) flushed before the journal says so (a merge on another machine reads it after)."""
    if rows.shape[0] == 0:
        return
    if rows.shape[1:] != tuple(shape[1:]):
        raise InputError(f"a partial of rows {rows.shape} does not fit a sum of {tuple(shape)}")
    with storage.disk_errors(path):
        mapped = np.load(path, mmap_mode="r+", allow_pickle=False)
        view = mapped.T  # the sum is kept in NIfTI's order, as a job's partials are
        view[lo : lo + rows.shape[0]] += rows
        if flush:
            mapped.flush()
        del view, mapped
