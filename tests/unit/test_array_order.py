"""The copy that puts arrays in NIfTI's (Fortran) order keeps every value where it was."""

from __future__ import annotations

import numpy as np
import pytest

from worker.jobs import f_order


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.bool_])
def test_f_order_of_a_cropped_c_array_keeps_values_and_is_fortran_contiguous(dtype: type) -> None:
    full = (np.random.default_rng(0).random((9, 8, 7)) * 255).astype(dtype)
    view = full[1:8, :7, 2:]  # a merge crops the padded volume: a view, neither C- nor F-contiguous
    ordered = f_order(view)
    assert ordered.flags.f_contiguous and ordered.shape == view.shape and ordered.dtype == view.dtype
    np.testing.assert_array_equal(ordered, view)
    assert f_order(ordered) is ordered



@pytest.mark.parametrize("shape", [(1, 40, 37, 23), (2, 10, 30, 17)])  # the second is padded (ROI 16 > 10)
def test_the_workspace_keeps_a_loaded_volume_in_nifti_order_and_load_input_indexes_it_as_before(
        tmp_path, shape: tuple[int, ...]) -> None:
    from segq import storage
    from segq.tiling import pad_volume, plan_windows
    from worker.engines.inference import nifti_order
    from worker.jobs import INPUT, load_input, preprocess, workspace_input

    volume = np.random.default_rng(2).normal(3.0, 2.0, size=shape).astype(np.float32)
    loaded = np.ascontiguousarray(volume.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)  # as load_volume gives it
    plan = plan_windows(shape[1:], (16, 16, 16), 0.5, "gaussian")
    expected = pad_volume(preprocess(volume, "zscore"), plan)  # the C-ordered path segq took before
    stored = workspace_input(loaded.copy(), plan, "zscore", inplace=True)
    assert stored.flags.c_contiguous and stored.shape == (shape[0], *reversed(plan.padded_shape))
    storage.save_array(tmp_path / INPUT, stored)
    view = load_input(tmp_path)
    assert nifti_order(view) and view.shape == expected.shape
    np.testing.assert_allclose(view, expected, rtol=0, atol=1e-5)  # the mean summed in another order
    # a C-ordered volume (not loaded from a file) is stored the same way
    np.testing.assert_array_equal(workspace_input(volume, plan, "zscore"), stored)


def test_a_workspace_written_before_the_nifti_order_still_loads(tmp_path) -> None:
    from segq import storage
    from worker.engines.inference import nifti_order
    from worker.jobs import CXYZ_INPUT, load_input

    legacy = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # (C, X, Y, Z), C-ordered
    storage.save_array(tmp_path / CXYZ_INPUT, legacy)
    view = load_input(tmp_path)
    assert not nifti_order(view)
    np.testing.assert_array_equal(view, legacy)


def test_checksums_cover_memory_order_bytes_without_copies() -> None:
    from segq import storage

    c = np.random.default_rng(3).random((6, 5, 4), dtype=np.float32)
    f = np.asfortranarray(c)
    assert storage.array_checksum(c) != storage.array_checksum(f)  # same values, other bytes
    assert storage.array_checksum(f) == storage.array_checksum(np.ascontiguousarray(f.T))
    assert storage.array_checksum(c[:, 1:]) == storage.array_checksum(np.ascontiguousarray(c[:, 1:]))
