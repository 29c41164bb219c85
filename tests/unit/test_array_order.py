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

