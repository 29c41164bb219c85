"""Workspace layout, atomic writes and path safety.

Every array a job produces lives under ``SEGQ_STORAGE/jobs/<job>/a<attempt>/``; across machines that
root is a shared filesystem. Files are written under a temporary name and renamed, so a reader never
sees half a file and a killed writer leaves only a temp file that the next attempt replaces.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from isal import isal_zlib

from segq.errors import DiskFullError, InputError, StorageNotSharedError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


def workspace(root: Path, job_id: str, attempt: int) -> Path:
    return root / "jobs" / job_id / f"a{attempt}"


def job_dir(root: Path, job_id: str) -> Path:
    return root / "jobs" / job_id


def require_workspace(path: Path, worker: str = "") -> Path:
    """The workspace must exist; if not, this worker's SEGQ_STORAGE is not the one the job was written to."""
    if not path.is_dir():
        who = f"worker {worker}" if worker else "this worker"
        raise StorageNotSharedError(
            f"{who} cannot see the job workspace {path}: storage is not shared (its SEGQ_STORAGE is not the "
            "storage the coordinator wrote to). Mount the same filesystem at the same path on every machine."
        )
    return path


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_workspace(root: Path, job_id: str, attempt: int) -> None:
    """Delete one attempt's workspace, and the job's directory once no attempt is left in it."""
    remove_tree(workspace(root, job_id, attempt))
    with contextlib.suppress(OSError):  # not empty: another attempt is running
        job_dir(root, job_id).rmdir()


def temp_name(final: Path) -> Path:
    """A hidden sibling of ``final`` that keeps its suffixes (nibabel picks the format from them)."""
    suffix = "".join(final.suffixes[-2:]) if final.name.endswith(".nii.gz") else final.suffix
    return final.with_name(f".{final.name.removesuffix(suffix)}.tmp-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(final: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path to write; on success rename it over ``final``, on failure remove it.

    ``durable`` fsyncs before the rename: outputs must survive a crash of the machine. Workspace
    arrays need not (a job whose machine crashed is redone), and an fsync of hundreds of MB costs
    seconds on every volume.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


_DISK_ERRNOS = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota", errno.EFBIG: "refuses a file this large",
                errno.EROFS: "is read-only"}


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full, over-quota or read-only disk under ``path`` into DiskFullError, which says what to do.

    Such a write fails the job (retrying at once would fail again); the temp file is gone by then, so after
    freeing space `segq retry --failed` works.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        raise DiskFullError(f"cannot write {path}: the disk {_DISK_ERRNOS[exc.errno]} ({exc.strerror}); free space "
                            "there (or make it writable), then `segq retry --failed`") from None


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete temp files of ``final`` left by a writer that was killed before its rename.

    Only the one writer of ``final`` may call this (a job's merge): it would delete a live writer's temp file.
    """
    pattern = temp_name(final).name.rsplit(".tmp-", 1)[0] + ".tmp-*"
    stale = list(final.parent.glob(pattern)) if final.parent.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def dense(array: np.ndarray) -> np.ndarray:
    """``array`` itself when it is C- or Fortran-contiguous (.npy stores either as it is), else a C copy."""
    return array if array.flags.c_contiguous or array.flags.f_contiguous else np.ascontiguousarray(array)


def save_array(final: Path, array: np.ndarray) -> None:
    """Write a workspace array as .npy atomically (no fsync: see atomic_path)."""
    with disk_errors(final), atomic_path(final, durable=False) as tmp, open(tmp, "wb") as handle:
        np.save(handle, dense(array), allow_pickle=False)


def save_array_once(final: Path, array: np.ndarray) -> bool:
    """Write a workspace array unless one is there already; True if this call wrote it (first writer wins).

    Two deliveries of one slab (a duplicated message, a redelivery after a lost ack) must not leave the
    partial of one beside the checksum the chord kept from the other: on a GPU two runs of a slab differ
    in their last bits. ``os.link`` publishes the file atomically and never replaces one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        with disk_errors(final), open(tmp, "wb") as handle:
            np.save(handle, dense(array), allow_pickle=False)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: check, then rename (a narrow race remains)
            if final.exists():
                return False
            os.replace(tmp, final)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_array(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def array_checksum(array: np.ndarray) -> str:
    """adler32 of the bytes in memory order, no copy: enough to catch a torn or stale partial. ISA-L's adler32
    gives zlib's value about 4x faster (0.012 s for a CT part's 94 MB on one core, against 0.05 s)."""
    array = dense(array)
    data = memoryview(array if array.flags.c_contiguous else array.T).cast("B")  # type: ignore[arg-type]
    return f"{isal_zlib.adler32(data):08x}"


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def require_allowed(path: Path, roots: list[Path], what: str) -> Path:
    """``path`` with symlinks resolved; InputError unless it lies inside one of ``roots`` (none: anywhere)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(path)):
        raise InputError(f"{what} {str(path)!r} holds control characters: rename it")
    try:
        resolved = path.expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a symlink loop
        raise InputError(f"{what} {path} cannot be resolved ({exc}): it is a symlink loop or a broken link; "
                         "remove or fix it") from None
    if roots and not any(resolved.is_relative_to(root) for root in roots):
        shown = os.pathsep.join(str(r) for r in roots)
        raise InputError(f"{what} {path} resolves to {resolved}, outside the allowed roots {shown} "
                         "(SEGQ_ALLOWED_ROOTS): move it there, or add its directory to SEGQ_ALLOWED_ROOTS")
    return resolved


def require_output_inside(output: Path, out_dir: Path, roots: list[Path]) -> None:
    """Check, just before writing, that ``output`` still lands inside ``out_dir`` and the allowed roots.

    Submit checked it too; this catches a directory swapped for a symlink since (and a tampered job row).
    """
    base = require_allowed(out_dir, roots, "output directory")
    try:
        relative = output.relative_to(out_dir)
    except ValueError:
        raise InputError(f"output {output} is not inside its dataset's output directory {out_dir}") from None
    if any(part in ("", ".", "..") or not _SAFE_NAME.match(part) for part in relative.parts):
        raise InputError(f"output {output} has a name that could escape {out_dir}")
    if not output.parent.resolve().is_relative_to(base):
        raise InputError(f"output {output} would land in {output.parent.resolve()}, outside {base}: a directory "
                         f"on the way is a symlink out of the output directory")


def probability_path(output: Path) -> Path:
    """Where ``--save-probabilities`` puts the float map beside a mask (NIfTI or DICOM SEG): ``<name>_prob.nii.gz``."""
    return output.with_name(output.name.replace("_seg.nii.gz", "_prob.nii.gz").replace("_seg.dcm", "_prob.nii.gz"))


def output_path(out_dir: Path, relative_input: Path) -> Path:
    """``<out>/<relative dirs>/<name without .nii/.nii.gz>_seg.nii.gz``, refusing names that could escape."""
    parts = list(relative_input.parts)
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"input name {relative_input} cannot be mapped inside the output directory")
    for part in parts:
        if not _SAFE_NAME.match(part):
            raise InputError(
                f"input name {relative_input} holds characters outside A-Z a-z 0-9 . _ + -: rename the file "
                "(spaces, quotes and control characters are refused so outputs land where expected)"
            )
    name = strip_nifti_suffix(parts[-1]) + "_seg.nii.gz"
    target = out_dir.joinpath(*parts[:-1], name)
    if not target.resolve().is_relative_to(out_dir.resolve()):
        raise InputError(f"output for {relative_input} would land outside {out_dir}")
    return target
