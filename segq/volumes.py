"""Reading NIfTI volumes: header checks for submit, full loads for the coordinator. No torch."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from isal import igzip, isal_zlib

from segq.errors import InputError

# Intel's ISA-L inflates and deflates 2-3x faster than zlib, with the same format (isal on PyPI); a CT's
# gzip stream is most of the time a coordinator spends preparing it.
IsalError = cast(type[Exception], isal_zlib.error)  # typed as an instance in its stub
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, IsalError, gzip.BadGzipFile, RuntimeError, MemoryError)
GZIP_SLACK = 1 << 20  # bytes a .nii.gz may hold beyond what its header describes


@dataclass(frozen=True)
class VolumeHeader:
    shape: tuple[int, ...]
    spacing: tuple[float, float, float]
    dtype: str

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape[:3]))

    @property
    def voxels_stored(self) -> int:
        """Every voxel of every channel: what the file must hold."""
        return int(np.prod(self.shape, dtype=np.int64))


def read_header(path: Path, max_voxels: int) -> VolumeHeader:
    """Parse only the header and refuse what cannot be a 3D volume (or a 4D stack of channels)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.load(str(path))
    except _READ_ERRORS + (ImageFileError,) as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({exc})") from exc
    shape = tuple(int(s) for s in image.shape)
    if len(shape) not in (3, 4) or any(s < 1 for s in shape):
        raise InputError(f"{path}: shape {shape} is not a 3D volume (or 4D with channels last)")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > max_voxels:
        raise InputError(f"{path}: {shape} is {voxels:,} voxels, above the limit of {max_voxels:,} (SEGQ_MAX_VOXELS)")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if not all(np.isfinite(zooms)) or any(z <= 0 for z in zooms):
        raise InputError(f"{path}: voxel spacing {zooms} is not positive and finite")
    if not np.all(np.isfinite(image.affine)):
        raise InputError(f"{path}: the affine holds NaN or infinite values")
    check_voxel_type(path, image.get_data_dtype())
    return VolumeHeader(shape, zooms, str(image.get_data_dtype()))  # type: ignore[arg-type]


def check_voxel_type(path: Path, dtype: np.dtype[Any]) -> None:
    """Refuse voxels that are not one real number each: complex (only the real part would be segmented)
    and RGB or other records (numpy cannot even convert them to float)."""
    if dtype.kind == "c":
        raise InputError(f"{path}: voxels are {dtype} (complex); segq would segment only the real part. "
                         "Save the magnitude (abs) or the part you mean as a real image")
    if dtype.kind not in "biuf":
        raise InputError(f"{path}: voxels are {dtype.names or dtype} (RGB or another record type), not one number "
                         "each; convert the image to greyscale or to channels (4D) first")


def check_channels(path: Path, header: VolumeHeader, in_channels: int) -> None:
    """The volume's channel count (the 4th axis, else 1) must be what the model takes."""
    channels = header.shape[3] if len(header.shape) == 4 else 1
    if channels != in_channels:
        raise InputError(f"{path}: the volume has {channels} channel(s) but the model takes {in_channels} "
                         "(in_channels in the model file): pass volumes with that many channels or another model")


def _check_stored_size(path: Path, needed: int) -> None:
    """The file must hold the bytes its header promises, and a .nii.gz not much more (a gzip bomb).

    Checked before the voxels are read, because the reader allocates the promised size first: a 1 kB file
    claiming a gigavoxel would otherwise cost gigabytes before failing. The gzip trailer's ISIZE (the size
    mod 2**32) settles a whole file at no cost; any other .nii.gz is counted, in chunks that are dropped.
    (A hostile file can fake ISIZE: then the reader allocates at most what SEGQ_MAX_VOXELS allows.)
    """
    if not path.name.endswith(".gz"):
        size = path.stat().st_size
        if size < needed:
            raise InputError(f"{path}: the file is corrupt or truncated: its header promises {needed:,} bytes, "
                             f"it holds {size:,}")
        return
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        if int.from_bytes(handle.read(4), "little") == needed % 2**32:
            return
    actual = _gunzipped_size(path, limit=needed + GZIP_SLACK)
    if actual < needed:
        raise InputError(f"{path}: the file is corrupt or truncated: its header promises {needed:,} bytes, the "
                         f"gzip stream holds {actual:,}")
    if actual > needed + GZIP_SLACK:
        raise InputError(f"{path}: the gzip stream holds more than {needed + GZIP_SLACK:,} bytes where the header "
                         f"promises {needed:,} (a gzip bomb?); refused")


def _gunzipped_size(path: Path, limit: int, chunk: int = 1 << 20) -> int:
    """Decompressed size of ``path``, counted in chunks, stopping once past ``limit``."""
    total = 0
    try:
        with igzip.open(path, "rb") as stream:
            while total <= limit and (block := stream.read(chunk)):
                total += len(block)
    except (OSError, EOFError, zlib.error, IsalError) as exc:
        raise InputError(f"{path}: the file is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    return total


# A .nii.gz this large is inflated in parallel where rapidgzip is installed and threads are given: one ISA-L thread
# inflates a CT in about 0.9 s, rapidgzip in 16 threads in 0.34 s (bench/decode.py, 16 cores). Below it, the
# threads' start costs more than they save.
PARALLEL_INFLATE_BYTES = 16 << 20


def inflate_threads(path: Path, threads: int) -> int:
    """Threads to inflate ``path`` with: ``threads`` (0: this process' cores, at most 16) for a large .nii.gz when
    rapidgzip is importable, else 1 (ISA-L in this thread)."""
    if threads == 1 or not path.name.endswith(".gz") or path.stat().st_size < PARALLEL_INFLATE_BYTES:
        return 1
    try:
        import rapidgzip  # noqa: F401
    except ImportError:
        return 1
    return threads or min(16, len(os.sched_getaffinity(0)))


def _inflating(path: Path, threads: int) -> Any:
    """A reading stream of ``path``'s inflated bytes: rapidgzip in ``threads`` threads, or ISA-L's igzip. Both check
    the gzip CRC at the stream's end (rapidgzip raises ValueError for a mismatch or a corrupt stream)."""
    if threads > 1:
        import rapidgzip

        return rapidgzip.open(str(path), parallelization=threads)
    return igzip.open(path, "rb")


def _read_voxels(path: Path, image: Any, threads: int = 1) -> np.ndarray:
    """The voxels as float32. A .nii.gz is read through a stream of our own that is then read to its end,
    bounded: the gzip CRC is checked only there, and the reader alone stops at the bytes it needs, so
    corrupt data that still inflates would be segmented. One decompression, as the reader's own."""
    if not path.name.endswith(".gz"):
        return np.asarray(image.get_fdata(dtype=np.float32, caching="unchanged"))
    from nibabel.fileholders import FileHolder

    with _inflating(path, inflate_threads(path, threads)) as stream:
        streamed = type(image).from_file_map({"image": FileHolder(fileobj=stream)})
        data = np.asarray(streamed.get_fdata(dtype=np.float32, caching="unchanged"))
        trailing = len(stream.read(GZIP_SLACK + 1))  # to the end of the stream: CRC and length checked
    if trailing > GZIP_SLACK:
        raise InputError(f"{path}: the gzip stream holds more than {GZIP_SLACK:,} bytes beyond what the header "
                         "describes (a gzip bomb?); refused")
    return data


def load_volume(path: Path, in_channels: int, max_voxels: int,
                inflate: int = 1) -> tuple[np.ndarray, np.ndarray, VolumeHeader]:
    """The volume as float32, channel-first (C, X, Y, Z), with its affine; InputError for anything unusable.
    ``inflate``: threads for a large .nii.gz's gzip stream (SEGQ_INFLATE_THREADS; see inflate_threads).

    The array may be a Fortran-ordered view of the file's data, not a C-contiguous copy.
    """
    import nibabel as nib

    header = read_header(path, max_voxels)
    check_channels(path, header, in_channels)
    image = nib.load(str(path))
    itemsize = image.get_data_dtype().itemsize
    _check_stored_size(path, int(getattr(image.dataobj, "offset", 0)) + header.voxels_stored * itemsize)
    try:
        data = _read_voxels(path, image, inflate)
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: the file is corrupt or truncated; its header promises {header.shape} "
                         f"{header.dtype} voxels that could not be read ({type(exc).__name__}: {exc})") from exc
    # min and max propagate NaN and show infinities: two passes and no volume-sized mask
    low, high = (data.min(), data.max()) if data.size else (0.0, 1.0)
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(f"{path}: {bad:,} voxels are NaN or infinite; fix or mask them before segmenting")
    if low == high:  # a blank export: any mask of it is the network's bias, not a finding
        raise InputError(f"{path}: every voxel is {float(low):g} (a constant volume): nothing to segment; "
                         "check the export that wrote it")
    # NIfTI data is stored in Fortran order; the caller decides where to pay for C order.
    volume = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return volume.astype(np.float32, copy=False), np.asarray(image.affine), header
