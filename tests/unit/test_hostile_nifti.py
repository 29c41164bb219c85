"""Hostile NIfTI files (issue 6, scenario 13): refused with a clear reason, before the voxels are allocated.

Memory is measured with tracemalloc (numpy and bytearray allocations are traced): a small file that
claims a huge volume must cost megabytes, not what it claims.
"""

from __future__ import annotations

import gzip
import re
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from segq.errors import InputError
from segq.volumes import load_volume, read_header

LIMIT = 1024**3  # the default SEGQ_MAX_VOXELS
DIM_OFFSET, SFORM_CODE_OFFSET, SROW_X_OFFSET = 40, 254, 280
NIFTI2_HEADER, NIFTI2_DIM_OFFSET = 540, 16


def nifti_bytes(shape: tuple[int, ...] = (16, 16, 16), dtype: type = np.float32, seed: int = 0,
                version: int = 1) -> bytearray:
    data: np.ndarray = np.random.default_rng(seed).normal(size=shape).astype(dtype)
    image_class = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    return bytearray(image_class(data, np.eye(4)).to_bytes())


def claim_shape(raw: bytearray, shape: tuple[int, ...]) -> bytearray:
    """Rewrite the header's dim field: the file keeps its few bytes and claims ``shape``.

    NIfTI-1 stores dims as int16 (65535 is written as the same 16 bits, which read back as -1); NIfTI-2
    as int64.
    """
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    if struct.unpack_from("<i", raw, 0)[0] == NIFTI2_HEADER:
        struct.pack_into("<8q", raw, NIFTI2_DIM_OFFSET, *dims)
    else:
        struct.pack_into("<8H", raw, DIM_OFFSET, *dims)
    return raw


def write(path: Path, raw: bytes | bytearray) -> Path:
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def peak_mb(call: Callable[[], Any]) -> tuple[float, BaseException | None]:
    """Peak traced allocation (MB) while ``call`` runs, and what it raised."""
    tracemalloc.start()
    raised: BaseException | None = None
    try:
        call()
    except Exception as exc:  # the test looks at it
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return peak, raised


def test_truncated_gzip_fails_on_load(tmp_path: Path) -> None:
    raw = gzip.compress(bytes(nifti_bytes((40, 40, 40))))
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    read_header(path, LIMIT)  # the header is whole: submit accepts it, the job fails alone
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_volume(path, 1, LIMIT)


def test_truncated_uncompressed_fails_on_load(tmp_path: Path) -> None:
    raw = nifti_bytes((40, 40, 40))
    path = write(tmp_path / "short.nii", raw[: len(raw) * 6 // 10])
    with pytest.raises(InputError, match="corrupt or truncated: its header promises"):
        load_volume(path, 1, LIMIT)


def test_corrupt_gzip_is_refused_even_when_it_still_inflates(tmp_path: Path) -> None:
    """Flipped bytes in a stored (uncompressed) deflate block inflate fine; only the CRC catches them."""
    raw = bytes(nifti_bytes((32, 32, 32)))
    stored = bytearray(gzip.compress(raw, compresslevel=0))
    stored[len(stored) // 2] ^= 0xFF
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(stored))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_volume(path, 1, LIMIT)
    inflated = bytearray(gzip.compress(raw))
    inflated[len(inflated) // 2] ^= 0x5A
    path.write_bytes(bytes(inflated))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_volume(path, 1, LIMIT)


@pytest.mark.parametrize(("name", "version", "side", "reason"), [
    ("huge2.nii", 2, 65535, "above the limit"),  # NIfTI-2: int64 dims, a real 65535^3 claim
    ("huge2.nii.gz", 2, 65535, "above the limit"),
    ("huge1.nii.gz", 1, 32767, "above the limit"),  # NIfTI-1's largest dim
    ("wrapped1.nii", 1, 65535, "not a 3D volume|not a readable NIfTI"),  # 65535 in int16 reads as -1
])
def test_header_claiming_a_huge_volume_is_refused_from_the_header(tmp_path: Path, name: str, version: int,
                                                                  side: int, reason: str) -> None:
    path = write(tmp_path / name, claim_shape(nifti_bytes(version=version), (side, side, side)))
    assert path.stat().st_size < 20_000
    peak, raised = peak_mb(lambda: read_header(path, LIMIT))
    assert isinstance(raised, InputError), raised
    assert re.search(reason, str(raised)), raised
    assert peak < 5, f"refusing a header cost {peak:.1f} MB"
    peak, raised = peak_mb(lambda: load_volume(path, 1, LIMIT))  # the worker refuses it the same way
    assert isinstance(raised, InputError) and peak < 5, (raised, peak)


def test_small_file_claiming_half_a_gigabyte_costs_no_memory(tmp_path: Path) -> None:
    """400^3 float64 (512 MB) is under the voxel limit; the file holds 32 kB: refused before allocation."""
    raw = claim_shape(nifti_bytes((16, 16, 16), np.float64), (400, 400, 400))
    path = write(tmp_path / "liar.nii.gz", raw)
    header = read_header(path, LIMIT)
    assert header.shape == (400, 400, 400)
    peak, raised = peak_mb(lambda: load_volume(path, 1, LIMIT))
    assert isinstance(raised, InputError) and "corrupt or truncated" in str(raised), raised
    assert peak < 16, f"refusing a lying header cost {peak:.1f} MB (it claims 512 MB)"


def test_gzip_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    """A 32^3 header followed by 64 MB of zeros: a 60 kB file; decompression stops past the header's size."""
    raw = nifti_bytes((32, 32, 32))
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(bytes(raw))
        zeros = bytes(1 << 20)
        for _ in range(64):
            handle.write(zeros)
    assert path.stat().st_size < 200_000
    peak, raised = peak_mb(lambda: load_volume(path, 1, LIMIT))
    assert isinstance(raised, InputError) and "gzip bomb" in str(raised), raised
    assert peak < 16, f"refusing a gzip bomb cost {peak:.1f} MB"


def test_five_dimensional_and_empty_shapes_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "five.nii.gz", nifti_bytes((8, 8, 8, 2, 2)))
    with pytest.raises(InputError, match="not a 3D volume"):
        read_header(path, LIMIT)
    path = write(tmp_path / "empty.nii", claim_shape(nifti_bytes(), (0, 16, 16)))
    with pytest.raises(InputError, match="not a 3D volume|not a readable NIfTI"):
        read_header(path, LIMIT)


def test_four_dimensional_with_wrong_channels_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "four.nii.gz", nifti_bytes((8, 8, 8, 3)))
    assert read_header(path, LIMIT).shape == (8, 8, 8, 3)
    with pytest.raises(InputError, match="has 3 channel"):
        load_volume(path, 1, LIMIT)


def test_nan_affine_is_refused(tmp_path: Path) -> None:
    raw = nifti_bytes()
    struct.pack_into("<h", raw, SFORM_CODE_OFFSET, 1)
    struct.pack_into("<f", raw, SROW_X_OFFSET, float("nan"))
    path = write(tmp_path / "nan_affine.nii.gz", raw)
    with pytest.raises(InputError, match="affine holds NaN"):
        read_header(path, LIMIT)


def test_nan_voxels_and_garbage_are_refused(tmp_path: Path) -> None:
    data = np.ones((8, 8, 8), np.float32)
    data[1, 2, 3] = np.inf
    path = tmp_path / "inf.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(InputError, match="NaN or infinite"):
        load_volume(path, 1, LIMIT)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(InputError, match="not a readable NIfTI"):
        read_header(junk, LIMIT)


def test_a_whole_volume_still_loads(tmp_path: Path) -> None:
    for name in ("ok.nii.gz", "ok.nii"):
        path = write(tmp_path / name, nifti_bytes((20, 18, 16)))
        volume, affine, header = load_volume(path, 1, LIMIT)
        assert volume.shape == (1, 20, 18, 16) and header.shape == (20, 18, 16)
