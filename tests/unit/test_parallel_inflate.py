"""A large .nii.gz is inflated by rapidgzip in several threads (segq.volumes.inflate_threads): the same voxels as
ISA-L's, and the same refusals of a truncated, corrupt or oversized gzip stream (scenario 13 through the other
reader). The size threshold is lowered so that test-sized files take the parallel path."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from segq import volumes
from segq.errors import InputError
from segq.volumes import inflate_threads, load_volume
from tests.unit.test_hostile_nifti import LIMIT, nifti_bytes

pytest.importorskip("rapidgzip")


@pytest.fixture
def parallel(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(volumes, "PARALLEL_INFLATE_BYTES", 0)
    return 2


def test_the_parallel_path_is_taken_only_for_a_large_gz(tmp_path: Path, parallel: int) -> None:
    path = tmp_path / "v.nii.gz"
    path.write_bytes(gzip.compress(bytes(nifti_bytes((8, 8, 8)))))
    assert inflate_threads(path, parallel) == 2
    assert inflate_threads(path, 1) == 1
    assert inflate_threads(tmp_path / "v.nii", parallel) == 1
    assert inflate_threads(path, 0) >= 1  # the process' cores


def test_a_small_gz_stays_on_isal(tmp_path: Path) -> None:
    path = tmp_path / "small.nii.gz"
    path.write_bytes(gzip.compress(bytes(nifti_bytes((8, 8, 8)))))
    assert inflate_threads(path, 8) == 1


def test_parallel_inflate_gives_isal_voxels(tmp_path: Path, parallel: int) -> None:
    raw = bytes(nifti_bytes((64, 48, 40), seed=3))
    path = tmp_path / "v.nii.gz"
    path.write_bytes(gzip.compress(raw, compresslevel=6))
    one, affine_one, _ = load_volume(path, 1, LIMIT, inflate=1)
    many, affine_many, _ = load_volume(path, 1, LIMIT, inflate=parallel)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(affine_one, affine_many)


def test_parallel_inflate_refuses_truncated_and_corrupt_streams(tmp_path: Path, parallel: int) -> None:
    raw = bytes(nifti_bytes((40, 40, 40)))
    path = tmp_path / "bad.nii.gz"
    packed = gzip.compress(raw)
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_volume(path, 1, LIMIT, inflate=parallel)
    stored = bytearray(gzip.compress(raw, compresslevel=0))
    stored[len(stored) // 2] ^= 0xFF  # inflates fine: only the CRC catches it
    path.write_bytes(bytes(stored))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_volume(path, 1, LIMIT, inflate=parallel)


def test_parallel_inflate_refuses_a_gzip_bomb(tmp_path: Path, parallel: int) -> None:
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(bytes(nifti_bytes((32, 32, 32))))
        for _ in range(16):
            handle.write(bytes(1 << 20))
    with pytest.raises(InputError, match="gzip bomb"):
        load_volume(path, 1, LIMIT, inflate=parallel)
