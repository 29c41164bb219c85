"""Workspace layout, atomic writes and path safety.

Every array a job produces lives under ``SEGQ_STORAGE/jobs/<job>/a<attempt>/``; across machines that
root is a shared filesystem. Files are written under a temporary name and renamed, so a reader never
sees half a file and a killed writer leaves only a temp file that the next attempt replaces.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from isal import isal_zlib

from segq.errors import DiskFullError, InputError, StorageNotSharedError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SEPARATORS = tuple(sep for sep in (os.sep, os.altsep) if sep)
# Shown escaped: they reorder the text around them on a terminal or in a page ("Trojan Source", CVE-2021-42574).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
NAME_MAX_FALLBACK = 255  # POSIX filesystems' usual limit, where os.pathconf cannot tell
PATH_MAX_FALLBACK = 4096


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
# numpy's tofile (np.save to a file) reports a short fwrite in its own words and without an errno.
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def disk_problem(exc: OSError) -> str | None:
    """What ``exc`` says of the disk ("is full (...)"), or None when it is not a full, over-quota or read-only one.

    A short write is a full disk too: the filesystem took part of the data and then had no room (or quota) for
    the rest; numpy says so as "204800 requested and 102368 written", with no errno."""
    if exc.errno in _DISK_ERRNOS:
        return f"{_DISK_ERRNOS[exc.errno]} ({exc.strerror})"
    found = _SHORT_WRITE.search(str(exc)) if exc.errno is None else None
    if found:
        return (f"is full (a short write: {found[1]} items requested and {found[2]} written, no room for the rest, or "
                "over its quota)")
    return None


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full, over-quota or read-only disk under ``path`` (a short write included) into DiskFullError,
    which says what to do.

    Such a write fails the job (retrying at once would fail again); the temp file is gone by then, so after
    freeing space `segq retry --failed` works.
    """
    try:
        yield
    except OSError as exc:
        problem = disk_problem(exc)
        if problem is None:
            raise
        raise DiskFullError(f"cannot write {path}: the disk {problem}; free space there (or make it writable), "
                            "then `segq retry --failed`") from None


def free_bytes(directory: Path) -> int:
    """Bytes free to this process on the filesystem that holds (or will hold) ``directory``."""
    return shutil.disk_usage(_existing_ancestor(directory)).free


# Filesystems where another machine may read what this one wrote through a memory map only once it is flushed.
_NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
                        "9p", "virtiofs", "fuse")


def on_network_filesystem(path: Path) -> bool:
    """Whether ``path`` lies on a network or cluster filesystem (by /proc/self/mounts; True where it cannot tell).

    On a local one every process of the machine shares the page cache, so what one wrote through a memory map is
    what another reads at once; an msync would only push it to the disk, seconds of a CT's stream for nothing."""
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return True
    kind = filesystem_type(str(_existing_ancestor(path).resolve()), mounts)
    return kind is None or kind.split(".")[0] in _NETWORK_FILESYSTEMS


def filesystem_type(target: str, mounts: str) -> str | None:
    """The type of the filesystem mounted deepest above the absolute path ``target``, by a mounts table's text."""
    table = [line.split()[1:3] for line in mounts.splitlines() if len(line.split()) >= 3]
    best = max((m for m in table if target == m[0] or target.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return None if best is None else best[1]


def size_text(count: float) -> str:
    """``count`` bytes for a message: 368 kB, 2.1 MB, 1.4 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}" if count < 100 * scale else f"{count / scale:.0f} {unit}"
    return f"{int(count)} bytes"


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete temp files of ``final`` left by a writer that was killed before its rename.

    Only the one writer of ``final`` may call this (a job's merge): it would delete a live writer's temp file.
    """
    # Escaped: a name may hold * ? [ ], which must not match (and delete) the temp files of other outputs.
    pattern = glob.escape(temp_name(final).name.rsplit(".tmp-", 1)[0]) + ".tmp-*"
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


def is_control(char: str) -> bool:
    """A C0 or C1 control character, NUL and DEL included: what a terminal acts on (ESC starts its sequences)."""
    return unicodedata.category(char) == "Cc"


def _unsafe_to_show(char: str) -> bool:
    return is_control(char) or char in _BIDI_CONTROLS or "\ud800" <= char <= "\udfff"


def printable(text: str) -> str:
    """``text`` with each control character, bidi override and undecodable byte written as its Python escape
    (``\\x1b``, ``\\u202e``): shown on a terminal or in a log it cannot clear the screen, recolour or reorder
    what follows. Everything else (spaces, accents, any script) is left as it is."""
    return "".join(ascii(c)[1:-1] if _unsafe_to_show(c) else c for c in text)


def controls_in(text: str) -> str:
    """The control characters ``text`` holds, escaped and space-separated ("" when none), for a message."""
    return " ".join(dict.fromkeys(ascii(c)[1:-1] for c in text if is_control(c)))


def name_problem(part: str) -> str | None:
    """Why ``part``, one component of an output path, cannot be used (None when it can).

    Only what could escape ``--out`` or act on a terminal is refused: a path separator, an empty name, ``.``,
    ``..``, NUL and other control characters, and bytes that are not UTF-8 (no database column holds them).
    Spaces, quotes, accents and names in any script are the filesystem's to allow, and it does.
    """
    if part in ("", ".", ".."):
        return f"is {part!r}, which names no file of its own"
    if any(sep in part for sep in _SEPARATORS):
        return "holds a path separator"
    if found := controls_in(part):
        return f"holds control characters ({found})"
    if any("\ud800" <= c <= "\udfff" for c in part):
        return "holds bytes that are not UTF-8 (the filesystem's encoding cannot decode them)"
    return None


def require_allowed(path: Path, roots: list[Path], what: str) -> Path:
    """``path`` with symlinks resolved; InputError unless it lies inside one of ``roots`` (none: anywhere)."""
    if found := controls_in(str(path)):
        raise InputError(f"{what} {printable(str(path))} holds control characters ({found}): rename it")
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
    if not relative.parts or any(name_problem(part) is not None for part in relative.parts):
        raise InputError(f"output {printable(str(output))} has a name that could escape {out_dir}")
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
        raise InputError(f"input name {printable(str(relative_input))} cannot be mapped inside the output directory")
    for part in parts:
        if (problem := name_problem(part)) is not None:
            raise InputError(f"input name {printable(str(relative_input))} {problem}: rename it (only path "
                             "separators, '..', NUL and control characters are refused)")
    name = strip_nifti_suffix(parts[-1]) + "_seg.nii.gz"
    target = out_dir.joinpath(*parts[:-1], name)
    if not target.resolve().is_relative_to(out_dir.resolve()):
        raise InputError(f"output for {printable(str(relative_input))} would land outside {out_dir}")
    return target


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem_limits(directory: Path) -> tuple[int, int]:
    """The longest file name and path, in bytes, of the filesystem that will hold ``directory`` (its nearest
    existing ancestor's: PC_NAME_MAX and PC_PATH_MAX), else POSIX's usual 255 and 4096."""
    where = _existing_ancestor(directory)
    limits = []
    for key, fallback in (("PC_NAME_MAX", NAME_MAX_FALLBACK), ("PC_PATH_MAX", PATH_MAX_FALLBACK)):
        try:
            limits.append(os.pathconf(where, key))
        except (OSError, ValueError):
            limits.append(fallback)
    return limits[0], limits[1]


def _bytes(count: int) -> str:
    return f"{count} byte" if count == 1 else f"{count} bytes"


def length_problem(files: list[Path], out_dir: Path) -> str | None:
    """Why the outputs ``files`` (a job's mask and its siblings, under ``out_dir``) would pass the filesystem's
    name or path limit (None when they fit). Counted in UTF-8 bytes, on the longest name written: the temp name
    each file is first written under (``atomic_path``: about 25 bytes longer), and each folder under ``out_dir``.
    Refused at submit, or the merge would fail with "File name too long" after all inference ran."""
    if not files:
        return None
    name_max, path_max = filesystem_limits(out_dir)
    temps = [temp_name(f) for f in files]
    folders = [part for f in files for part in f.parent.relative_to(out_dir).parts]
    longest = max([*(t.name for t in temps), *folders], key=lambda n: len(os.fsencode(n)))
    size = len(os.fsencode(longest))
    if size > name_max:
        kind = ("a folder it makes under --out" if longest in folders
                else "the longest file segq writes for it (a temp name, before the rename)")
        return (f"is too long: {kind} would be {size} bytes in UTF-8, over the {name_max} bytes per name of the "
                f"filesystem holding {out_dir} (PC_NAME_MAX): shorten the name by {_bytes(size - name_max)} or more")
    deepest = max((len(os.fsencode(str(t))) for t in temps), default=0)
    if deepest > path_max:
        return (f"is too deep: its output path would be {deepest} bytes, over the filesystem's limit of {path_max} "
                f"(PC_PATH_MAX); choose a shorter --out or fewer nested folders")
    return None
