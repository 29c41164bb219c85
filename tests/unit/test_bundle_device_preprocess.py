"""A bundle's preprocessing split between the coordinator (its readers) and the GPU worker (the rest).

For every bundle shape the tests make (the Model Zoo's real configs), the readers and then the rest on a
device tensor give the array and the trace that the whole preprocessing gives in one Compose, and the grid
estimated from the affine alone (what decides a case's parts before it is resampled) is the grid it lands on,
up to rounding and crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segq.pipeline import bundle_stages, load_pipeline
from tests.bundles import SHAPES, make_bundle, make_case


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
@pytest.mark.parametrize("shape", SHAPES)
def test_readers_then_rest_equal_the_whole_preprocessing(shape: str, orientation: str, tmp_path: Path) -> None:
    spec = load_pipeline(make_bundle(shape, tmp_path), trust=True)
    readers, rest = bundle_stages.split_preprocessing(spec)
    assert readers and rest, f"{shape}: nothing of its preprocessing would run on the GPU worker"
    assert all(type(t).__name__ in bundle_stages.READERS for t in readers)
    case = make_case(shape, tmp_path / "scans", "c", orientation=orientation, size=(40, 36, 18), seed=3)
    whole, meta, operations = bundle_stages.preprocess_case(spec, case)
    read = bundle_stages.read_case(spec, case)
    assert read is not None
    array, read_meta, read_operations = read
    grid, device_meta, device_operations = bundle_stages.preprocess_on_device(spec, array, read_meta,
                                                                              read_operations, "cpu")
    np.testing.assert_array_equal(grid.numpy(), whole)
    assert [op["class"] for op in device_operations] == [op["class"] for op in operations]
    np.testing.assert_allclose(np.asarray(device_meta["affine"]), np.asarray(meta["affine"]), atol=1e-6)
    estimate = bundle_stages.estimated_grid(spec, np.asarray(read_meta["affine"]), array.shape[1:])
    for guessed, true in zip(estimate, whole.shape[1:], strict=True):
        assert abs(guessed - true) <= max(2, 0.1 * true), (shape, orientation, estimate, whole.shape)


def test_a_preprocessing_without_readers_stays_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Compose that does not start with a reader runs on the coordinator, all of it."""

    class Scale:  # not a reader
        pass

    class Pre:
        transforms = [Scale()]

    monkeypatch.setattr(bundle_stages, "sections", lambda spec: ("image", Pre(), None))
    readers, rest = bundle_stages.split_preprocessing(object())  # type: ignore[arg-type]
    assert rest == [] and len(readers) == 1
